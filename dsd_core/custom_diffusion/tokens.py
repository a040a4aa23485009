"""Modifier tokens (``<new1>``, ``<new2>``, ...): new words for the tuned concepts, in FLUX's text encoders.

Each token is added to the T5 tokenizer (``tokenizer_2``; optionally also CLIP-L's ``tokenizer``) and gets its own
embedding vector, held in a small separate :class:`torch.nn.Parameter` (``n_tokens x dim`` per encoder). The
embedding table itself is never resized, modified or handed to the optimiser. A router on the encoder's input
embedding swaps in the vectors for the new ids (so ids beyond the table -- e.g. the tiny test tokenizer's -- work,
and T5-XXL's 28 unused rows are not touched either).

This avoids by construction both quirks of the public Custom Diffusion scripts (personalization-methods.md §1.2):
no gradient mask over the table is needed (their mask loop drops the last of several tokens), and AdamW's weight
decay only ever sees the new rows (theirs decays the whole table).

Initialisation: the mean of the class word's piece embeddings (``"cat"`` -> the rows of its pieces), as the FLUX
recipe of §5.2 recommends; CD's SD scripts start from rare tokens instead (``ktn``, ``pll``, ``ucd``) -- pass those
as ``init_words`` to reproduce that. The class word stays in the prompt: ``"photo of a <new1> cat"``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError

ENCODERS = {"t5": ("tokenizer_2", "text_encoder_2"), "clip": ("tokenizer", "text_encoder")}
TOKEN_PATTERN = re.compile(r"<[A-Za-z0-9_\-]+>")


def find_tokens(prompt: str) -> list[str]:
    """The ``<...>``-style modifier tokens a prompt uses."""
    return TOKEN_PATTERN.findall(prompt or "")


def check_prompt(prompt: str, available) -> None:
    """Raise :class:`InputError` if ``prompt`` uses a modifier token no applied concept provides."""
    available = set(available)
    unknown = [t for t in find_tokens(prompt) if t not in available]
    if unknown:
        have = ", ".join(sorted(available)) or "none"
        raise InputError(f"the prompt uses {', '.join(unknown)}, which no applied concept delta defines (available: "
                         f"{have}). Apply the concept delta that defines it, or fix the token's spelling.")


#: token -> number of attached ModifierTokens providing it (in any encoder)
_ACTIVE: dict[str, int] = {}


class _TokenRouter:
    """Lives on one input-embedding module; replaces the output rows of the registered token ids."""

    def __init__(self, embedding: nn.Embedding):
        self.embedding = embedding
        self.known: dict[int, str] = {}  # every id ever added by us -> its token (inactive ones are an error)
        self.sources: dict[int, tuple[nn.Parameter, int, str]] = {}  # id -> (parameter, row, token)
        self._pending = None
        self.handles = [embedding.register_forward_pre_hook(self._pre), embedding.register_forward_hook(self._post)]

    @staticmethod
    def of(embedding: nn.Embedding) -> "_TokenRouter":
        router = embedding.__dict__.get("_dsd_token_router")
        if router is None:
            router = _TokenRouter(embedding)
            embedding.__dict__["_dsd_token_router"] = router
        return router

    def _pre(self, module, args):
        ids = args[0]
        if not self.known:
            return None
        known = torch.tensor(sorted(self.known), device=ids.device, dtype=ids.dtype)
        mask = torch.isin(ids, known)
        if not bool(mask.any()):
            self._pending = None
            return None
        self._pending = (ids, mask)
        return (ids.masked_fill(mask, 0),) + tuple(args[1:])

    def _post(self, module, args, output):
        pending, self._pending = self._pending, None
        if pending is None:
            return output
        ids, mask = pending
        for token_id in torch.unique(ids[mask]).tolist():
            source = self.sources.get(token_id)
            if source is None and _ACTIVE.get(self.known[token_id]):
                # provided in another encoder only (e.g. a T5-only concept after a CLIP one added the token here):
                # the encoder's unknown-token row, the same every time
                unk = getattr(self, "unk_id", 0)
                vector = module.weight[unk].to(device=output.device, dtype=output.dtype)
                output = torch.where((ids == token_id).unsqueeze(-1), vector, output)
                continue
            if source is None:
                raise InputError(f"the prompt uses {self.known[token_id]}, a modifier token whose concept delta is no "
                                 "longer applied; apply that concept delta again or remove the token from the prompt.")
            param, row, _ = source
            vector = param[row].to(device=output.device, dtype=output.dtype)
            output = torch.where((ids == token_id).unsqueeze(-1), vector, output)
        return output


class ModifierTokens(nn.Module):
    """Learned embeddings of ``tokens`` for the encoders in ``encoders`` (``"t5"``, optionally ``"clip"``)."""

    def __init__(self, tokens: list[str], init_words: list[str], embeddings: dict[str, torch.Tensor]):
        super().__init__()
        if len(tokens) != len(init_words):
            raise InputError(f"{len(tokens)} modifier tokens but {len(init_words)} initialiser words; give one class "
                             "word per token.")
        for token in tokens:
            if not TOKEN_PATTERN.fullmatch(token):
                raise InputError(f"modifier token {token!r} must look like <new1>: letters, digits, _ or - inside "
                                 "angle brackets.")
        if len(set(tokens)) != len(tokens):
            raise InputError(f"modifier tokens must be distinct, got {tokens}.")
        self.tokens = list(tokens)
        self.init_words = list(init_words)
        self.embeddings = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float()) for k, v in embeddings.items()})
        self._attached: list[tuple[_TokenRouter, list[int]]] = []

    @property
    def encoders(self) -> list[str]:
        return list(self.embeddings.keys())

    @classmethod
    def from_words(cls, pipe, tokens: list[str], init_words: list[str], encoders=("t5",)) -> "ModifierTokens":
        """New tokens, each initialised to the mean embedding of its word's pieces in each encoder."""
        embeddings = {}
        for enc in encoders:
            if enc not in ENCODERS:
                raise InputError(f"unknown text encoder {enc!r} for modifier tokens; use 't5' and/or 'clip'.")
            tokenizer, encoder = _parts(pipe, enc)
            table = _input_embedding(encoder).weight
            rows = []
            for token, word in zip(tokens, init_words):
                ids = tokenizer(word, add_special_tokens=False).input_ids
                ids = [i for i in ids if i < table.shape[0]]
                if not ids:
                    raise InputError(f"the initialiser word {word!r} of {token} has no pieces in the {enc} "
                                     "tokenizer; pass a plain word such as the class name ('cat').")
                rows.append(table[ids].detach().float().mean(0))
            embeddings[enc] = torch.stack(rows)
        return cls(tokens, init_words, embeddings)

    # ------------------------------------------------------------------ pipeline
    def attach(self, pipe) -> "ModifierTokens":
        """Add the tokens to the pipeline's tokenizers and route their ids to these embeddings."""
        if self._attached:
            raise InputError("these modifier tokens are already attached; detach() them first.")
        for enc in self.encoders:
            tokenizer, encoder = _parts(pipe, enc)
            router = _TokenRouter.of(_input_embedding(encoder))
            router.unk_id = min(int(tokenizer.unk_token_id or 0), router.embedding.num_embeddings - 1)
            new = [t for t in self.tokens if t not in tokenizer.get_vocab()]
            if new:
                tokenizer.add_tokens(new)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            for row, (token, token_id) in enumerate(zip(self.tokens, ids)):
                if token_id in router.sources and router.sources[token_id][0] is not self.embeddings[enc]:
                    self._attached.append((router, ids[:row]))
                    self._unregister()
                    raise InputError(f"{token} is already defined by another applied concept; remove that concept "
                                     "first, or rename one of the tokens (merge renames clashing tokens).")
                router.known[token_id] = token
                router.sources[token_id] = (self.embeddings[enc], row, token)
            self._attached.append((router, ids))
        for token in self.tokens:
            _ACTIVE[token] = _ACTIVE.get(token, 0) + 1
        return self

    def detach(self) -> None:
        if self._attached:
            for token in self.tokens:
                _ACTIVE[token] = max(0, _ACTIVE.get(token, 0) - 1)
        self._unregister()

    def _unregister(self) -> None:
        for router, ids in self._attached:
            for token_id in ids:
                src = router.sources.get(token_id)
                if src is not None and any(src[0] is p for p in self.embeddings.values()):
                    del router.sources[token_id]
        self._attached = []

    def renamed(self, mapping: dict[str, str]) -> "ModifierTokens":
        """A copy with tokens renamed (``{"<new1>": "<new2>"}``), same vectors."""
        return ModifierTokens([mapping.get(t, t) for t in self.tokens], self.init_words,
                              {k: v.detach() for k, v in self.embeddings.items()})

    # ------------------------------------------------------------------ files
    def state(self) -> dict[str, torch.Tensor]:
        return {f"modifier_tokens.{enc}": p.detach().contiguous() for enc, p in self.embeddings.items()}

    @classmethod
    def from_state(cls, tensors: dict, tokens: list[str], init_words: list[str]) -> "ModifierTokens":
        embeddings = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("modifier_tokens.")}
        return cls(tokens, init_words, embeddings)

    @staticmethod
    def concat(parts: list["ModifierTokens"]) -> "ModifierTokens":
        """One set holding the tokens of ``parts`` (they must be distinct and use the same encoders)."""
        encoders = parts[0].encoders
        for p in parts[1:]:
            if p.encoders != encoders:
                raise InputError(f"cannot combine concepts whose tokens live in different encoders ({encoders} vs "
                                 f"{p.encoders}).")
        return ModifierTokens(sum((p.tokens for p in parts), []), sum((p.init_words for p in parts), []),
                              {enc: torch.cat([p.embeddings[enc].detach() for p in parts]) for enc in encoders})


def _parts(pipe, encoder: str):
    tok_name, enc_name = ENCODERS[encoder]
    tokenizer, model = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
    if tokenizer is None or model is None:
        raise InputError(f"the pipeline has no {enc_name} / {tok_name} (released or not loaded); modifier tokens "
                         "need the text encoders.")
    return tokenizer, model


def _input_embedding(model) -> nn.Embedding:
    """The embedding module the encoder's forward really calls (T5's ``encoder.embed_tokens`` is a module of its
    own in transformers 5, sharing its weight with ``shared``)."""
    stack = getattr(model, "encoder", None)
    embedding = getattr(stack, "embed_tokens", None)
    return embedding if isinstance(embedding, nn.Embedding) else model.get_input_embeddings()
