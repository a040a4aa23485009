"""Closed-form merge of separately tuned concepts (Custom Diffusion's ``composenW``, personalization-methods.md §2).

Per tuned layer with base weight ``W0``, find the ``W`` that keeps generic text features' outputs as close to the base
as possible while reproducing every concept's outputs on that concept's own tokens::

    W = argmin ||(W - W0) C_reg^T||^2 + lam ||W - W0||^2    s.t.   W C^T = V^T,   V_i rows = (W0 + dW_i) c

    =>  dW = R^T (C M^-1 C^T)^+ C M^-1,     M = C_reg^T C_reg + lam I,   R rows = dW_i c   (c in concept i's rows)

``W0`` cancels, so only the deltas are needed; the result is a low-rank delta of rank <= M (the constraint rows),
stored in LoRA form. Differences from CD's SD script (§5.2 FLUX recipe): a **ridge** term (``lam = ridge x mean
eigenvalue of C_reg^T C_reg``; CD has none and needs N >> d), a pseudo-inverse for the constraint system (so more
rows than dimensions degrade to least squares instead of failing), and **per-layer features collected by forward
hooks on the base model** over regularisation prompts x noise levels x random latents, because FLUX's text-side
inputs depend on the timestep, the pooled CLIP vector and (after block 0) the image. Concept rows are the tokens of
``<token> <class word>`` located with tokenizer offsets inside CD's two target prompts (``"<new1> cat"`` and
``"photo of a <new1> cat"``). Biases are not tuned, so no augmentation is needed. Every layer is solved on the base
model's features (one pass); later blocks' inputs drift slightly once earlier blocks are merged (an approximation
CD shares).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .delta_file import ConceptFile, is_dsd
from .parameters import ConceptDeltas, LayerDelta
from .tokens import ModifierTokens

#: Generic captions used as regularisation prompts when no file is given (CD reads 200 LAION captions).
REGULARISATION_PROMPTS = (
    "a photo of a city street at night", "a bowl of fruit on a wooden table", "a mountain lake at sunrise",
    "portrait of an old man with a beard", "a red car parked in front of a house", "a dog running on the beach",
    "an oil painting of a sailing ship", "a cup of coffee next to a laptop", "a forest path in autumn",
    "a woman reading a book in a cafe", "a cat sleeping on a sofa", "a plate of pasta with tomato sauce",
    "a modern kitchen with white cabinets", "children playing soccer in a park", "a bird sitting on a branch",
    "a snowy village with wooden houses", "a close up of a flower with dew drops", "a bicycle leaning on a wall",
    "an astronaut floating in space", "a watercolor painting of a garden", "a crowded market in the morning",
    "a teddy bear on a bed", "a lighthouse on a rocky coast", "a bridge over a river in the fog",
    "a man wearing a hat and a coat", "a pizza with mushrooms and cheese", "a cartoon drawing of a robot",
    "a field of sunflowers under a blue sky", "a train arriving at a station", "a wooden chair in an empty room",
    "a horse in a meadow", "a glass of orange juice", "a living room with a fireplace", "a beach with palm trees",
    "a pair of shoes on the floor", "a desk with books and a lamp", "a sports car on a race track",
    "a toy on a table", "a group of friends at a party", "a black and white photo of a building",
)
TARGET_TEMPLATES = ("{token} {word}", "photo of a {token} {word}")


@dataclass
class LayerFeatures:
    """Collected inputs of one layer: the regularisation Gram matrix and each concept's constraint rows."""

    gram: torch.Tensor  # (d, d) float64
    count: int = 0
    concept_rows: dict = field(default_factory=dict)  # concept index -> (m, d) float64


def token_positions(tokenizer, prompt: str, phrase: str, max_length: int) -> list[int]:
    """T5 token positions covering ``phrase`` inside ``prompt`` (located by character offsets)."""
    start = prompt.find(phrase)
    if start < 0:
        raise InputError(f"{phrase!r} is not in {prompt!r}.")
    end = start + len(phrase)
    enc = tokenizer(prompt, max_length=max_length, truncation=True, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]


def num_prompt_tokens(tokenizer, prompt: str, max_length: int) -> int:
    """Real (non-padding) T5 tokens of ``prompt``, end-of-sequence included."""
    return len(tokenizer(prompt, max_length=max_length, truncation=True).input_ids)


@torch.no_grad()
def collect_features(pipe, layers: dict[str, str], reg_prompts: list[str], targets: list[list[tuple[str, str]]],
                     sigmas=(0.25, 0.5, 0.75, 1.0), num_latents: int = 1, size: int = 256, guidance: float = 3.5,
                     max_sequence_length: int = 128, seed: int = 0, progress=None) -> dict[str, LayerFeatures]:
    """Inputs of the given layers (``name -> rows``: ``all`` or ``text``) on the base model.

    ``targets[i]`` lists ``(prompt, phrase)`` pairs of concept ``i``: its rows are the tokens of ``phrase``. The
    tokens used must already be attached to ``pipe`` (their embeddings), the deltas must not be.
    """
    from .. import canvas as cv

    dev, dtype = pipe._execution_device, pipe.transformer.dtype
    dsd = is_dsd(pipe)
    width = 2 * size if dsd else size
    h, w = cv.latent_size(size, width, pipe.vae_scale_factor)
    ch = pipe.transformer.config.in_channels // 4
    gen = torch.Generator().manual_seed(seed)
    latents = [cv.pack_latents(torch.randn(1, ch, h, w, generator=gen)).to(dev, dtype) for _ in range(num_latents)]
    conds = [cv.pack_latents(torch.randn(1, ch, h, w, generator=gen)).to(dev, dtype) for _ in range(num_latents)]
    img_ids = cv.latent_image_ids(size, width, dev, dtype, pipe.vae_scale_factor)
    g = torch.full((1,), guidance, device=dev) if pipe.transformer.config.guidance_embeds else None

    feats: dict[str, LayerFeatures] = {}
    state = {"rows": None}
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args, output):
            captured[name] = args[0][0, state["rows"]].double().cpu()
        return hook

    handles = [pipe.transformer.get_submodule(n).register_forward_hook(make_hook(n)) for n in layers]
    jobs = [(None, p, None) for p in reg_prompts] + [(i, p, ph) for i, items in enumerate(targets) for p, ph in items]
    try:
        for k, (concept, prompt, phrase) in enumerate(jobs):
            embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=dev,
                                                          max_sequence_length=max_sequence_length)
            if concept is None:
                rows = list(range(num_prompt_tokens(pipe.tokenizer_2, prompt, max_sequence_length)))
            else:
                rows = token_positions(pipe.tokenizer_2, prompt, phrase, max_sequence_length)
            state["rows"] = torch.tensor(rows)
            for sigma in sigmas:
                for x, cond in zip(latents, conds):
                    kwargs = {"condition_hidden_states": cond} if dsd else {}
                    pipe.transformer(hidden_states=x, timestep=torch.full((1,), sigma, device=dev, dtype=dtype),
                                     guidance=g, pooled_projections=pooled, encoder_hidden_states=embeds,
                                     txt_ids=text_ids, img_ids=img_ids, return_dict=False, **kwargs)
                    for name, x_rows in captured.items():
                        f = feats.get(name)
                        if f is None:
                            f = feats[name] = LayerFeatures(torch.zeros(x_rows.shape[1], x_rows.shape[1],
                                                                        dtype=torch.float64))
                        if concept is None:
                            f.gram += x_rows.T @ x_rows
                            f.count += x_rows.shape[0]
                        else:
                            prev = f.concept_rows.get(concept)
                            f.concept_rows[concept] = x_rows if prev is None else torch.cat([prev, x_rows])
                    captured.clear()
            if progress is not None:
                progress(k + 1, len(jobs))
    finally:
        for handle in handles:
            handle.remove()
    return feats


def solve_layer(features: LayerFeatures, deltas: list[torch.Tensor | None], ridge: float = 1e-3
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged low-rank delta ``(up, down)`` of one layer from its features and each concept's dense delta."""
    rows, outs = [], []
    for i, delta in enumerate(deltas):
        c = features.concept_rows.get(i)
        if c is None:
            continue
        rows.append(c)
        outs.append(c @ delta.double().T if delta is not None else torch.zeros(c.shape[0], _out_dim(deltas),
                                                                                  dtype=torch.float64))
    if not rows:
        raise InputError("no concept rows were collected for a layer; check the concepts' prompts and tokens.")
    C, R = torch.cat(rows), torch.cat(outs)
    d = C.shape[1]
    gram = features.gram
    lam = ridge * float(torch.trace(gram)) / d if features.count else ridge
    M = gram + max(lam, 1e-12) * torch.eye(d, dtype=torch.float64)
    MinvCt = torch.linalg.solve(M, C.T)  # (d, m)
    G = C @ MinvCt  # (m, m)
    K = torch.linalg.pinv(G, hermitian=True, rtol=1e-10) @ MinvCt.T  # (m, d)
    return R.T.float(), K.float()


def _out_dim(deltas) -> int:
    return next(dl.shape[0] for dl in deltas if dl is not None)


def rename_tokens(concepts: list[ConceptFile]) -> list[dict[str, str]]:
    """Token renames that make every concept's tokens distinct (``<new1>`` of the second concept -> ``<new2>``)."""
    used: set[str] = set()
    everyone = {t for c in concepts for t in c.token_names}
    maps = []
    for concept in concepts:
        mapping = {}
        for token in concept.token_names:
            new = token
            if new in used:
                n = 1
                while f"<new{n}>" in used or f"<new{n}>" in everyone:
                    n += 1
                new = f"<new{n}>"
            used.add(new)
            if new != token:
                mapping[token] = new
        maps.append(mapping)
    return maps


@dataclass
class MergeResult:
    concept: ConceptFile
    renames: list  # per input concept: {old token: new token}
    constraint_error: dict  # layer -> max relative error on the concept rows


def merge(pipe, concepts: list[ConceptFile], reg_prompts: list[str] | None = None, ridge: float = 1e-3,
          sigmas=(0.25, 0.5, 0.75, 1.0), num_latents: int = 1, size: int = 256, seed: int = 0,
          max_sequence_length: int = 128, progress=None, check: bool = True) -> MergeResult:
    """Merge separately tuned concepts into one delta with all their tokens (see module docstring)."""
    from .delta_file import check_base

    if len(concepts) < 2:
        raise InputError("merge needs at least two concept deltas.")
    reg_prompts = list(reg_prompts or REGULARISATION_PROMPTS)
    for c in concepts:
        if check:
            check_base(pipe.transformer, c.probe, c.info.get("name", "a concept delta"))
        if c.tokens is None:
            raise InputError("every merged concept needs its modifier token; one of the files has none.")
    renames = rename_tokens(concepts)
    tokens = [c.tokens.renamed(m) for c, m in zip(concepts, renames)]
    layers: dict[str, str] = {}
    for c in concepts:
        for layer in c.deltas.layers:
            layers.setdefault(layer.target.name, layer.target.rows)
    targets = []
    for c, tok in zip(concepts, tokens):
        items = []
        for token, word in zip(tok.tokens, tok.init_words):
            phrase = f"{token} {word}"
            items += [(t.format(token=token, word=word), phrase) for t in TARGET_TEMPLATES]
        targets.append(items)
    for t in tokens:
        t.attach(pipe)
    try:
        feats = collect_features(pipe, layers, reg_prompts, targets, sigmas, num_latents, size,
                                 max_sequence_length=max_sequence_length, seed=seed, progress=progress)
    finally:
        for t in tokens:
            t.detach()
    merged, errors = [], {}
    by_name = [c.deltas.by_name() for c in concepts]
    for name, rows in layers.items():
        dense = [b[name].matrix().float().cpu() if name in b else None for b in by_name]
        up, down = solve_layer(feats[name], dense, ridge)
        template = next(b[name] for b in by_name if name in b)
        merged.append(LayerDelta.from_tensors(template.target, up=up, down=down))
        errs = []
        for i, dl in enumerate(dense):
            c = feats[name].concept_rows.get(i)
            if c is None or dl is None:
                continue
            want = c.float() @ dl.T
            got = c.float() @ (up @ down).T
            errs.append(float((got - want).norm() / want.norm().clamp_min(1e-12)))
        errors[name] = max(errs) if errs else 0.0
    info = {k: v for k, v in concepts[0].info.items() if k in ("parameters", "base_kind")}
    info["concepts"] = [c.info.get("concepts", []) for c in concepts]
    info["merge"] = {"method": "constrained least squares (CD composenW) with ridge", "ridge": ridge,
                     "regularisation_prompts": len(reg_prompts), "sigmas": list(sigmas), "renames": renames,
                     "max_constraint_error": max(errors.values())}
    probe = {}
    for c in concepts:
        probe.update(c.probe)
    return MergeResult(ConceptFile(ConceptDeltas(merged), ModifierTokens.concat(tokens), probe, info), renames, errors)


def average(concepts: list[ConceptFile]) -> ConceptFile:
    """Naive merge for comparison: the mean of the dense deltas (tokens renamed and joined as in :func:`merge`)."""
    renames = rename_tokens(concepts)
    tokens = [c.tokens.renamed(m) for c, m in zip(concepts, renames)]
    names: dict[str, object] = {}
    for c in concepts:
        for layer in c.deltas.layers:
            names.setdefault(layer.target.name, layer.target)
    layers = []
    for name, target in names.items():
        mats = [c.deltas.by_name()[name].matrix() for c in concepts if name in c.deltas.by_name()]
        layers.append(LayerDelta.from_tensors(target, weight=sum(mats) / len(concepts)))
    probe = {}
    for c in concepts:
        probe.update(c.probe)
    return ConceptFile(ConceptDeltas(layers), ModifierTokens.concat(tokens), probe, dict(concepts[0].info))
