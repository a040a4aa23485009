"""CLIP-L and T5-XXL text encoders from ComfyUI's single files (Hugging Face key names).

* ``clip_l.safetensors``: ``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.N...`` (any
  prefix, e.g. ``cond_stage_model.transformer.``); ``text_projection.weight``, ``logit_scale`` and ``position_ids``
  are not part of ``CLIPTextModel`` and are skipped.
* ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn(_scaled).safetensors``: ``shared.weight``,
  ``encoder.block.N...`` (any prefix, e.g. ``text_encoders.t5xxl.transformer.``); ``encoder.embed_tokens`` is the
  same tensor as ``shared``; decoder tensors of a full T5 file are skipped.

Configs: the shipped ``clip_l.json`` / ``t5xxl_encoder.json`` when the tensor shapes are those of the full models,
otherwise derived from the shapes (tiny test models). What shapes cannot tell is fixed: CLIP heads of 64 channels
(8 below 64), ``quick_gelu``; T5 ``relative_attention_max_distance=128``. Override with ``config=``.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping

import torch

from ..errors import ModelFormatError
from .checkpoint import Checkpoint, find_prefix, instantiate
from .configs import read_config, shipped_config

logger = logging.getLogger(__name__)

CLIP_WHAT = "CLIP-L text encoder"
CLIP_HINT = "clip_l.safetensors (ComfyUI: models/text_encoders or models/clip)"
CLIP_ANCHOR = "embeddings.token_embedding.weight"
CLIP_SKIPPED = ("text_projection.weight", "text_projection", "logit_scale", "visual_projection.weight")
CLIP_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")

T5_WHAT = "T5-XXL text encoder"
T5_HINT = "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (ComfyUI: models/text_encoders or models/clip)"
T5_ANCHOR = "encoder.final_layer_norm.weight"
T5_SIZE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                "feed_forward_proj")


def _count(names, prefix: str) -> int:
    found = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    return max(found) + 1 if found else 0


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _derive(fn, shapes, source, hint, *args):
    try:
        return fn(shapes, *args)
    except KeyError as e:
        raise ModelFormatError(f"{source} is missing {e.args[0]}; the file is incomplete, download it again "
                               f"({hint}).") from None


# ---------------------------------------------------------------------------------------------------------- CLIP
@functools.lru_cache(maxsize=None)
def _clip_model_prefix() -> str:
    """Where CLIPTextModel keeps its weights: ``text_model.`` in transformers 4, nothing in transformers 5."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, vocab_size=4, max_position_embeddings=4,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return find_prefix(model.state_dict(), CLIP_ANCHOR) or ""


def clip_names(names: list[str], source: str, wrong_file=None) -> dict[str, str]:
    """{file name: CLIPTextModel name} for a CLIP-L file."""
    prefix = find_prefix(names, CLIP_ANCHOR)
    if prefix is None:
        if wrong_file is not None:
            raise wrong_file("text_model." + CLIP_ANCHOR)
        raise ModelFormatError(f"{source} is not a CLIP text encoder (no {CLIP_ANCHOR}); pass {CLIP_HINT}.")
    outer = prefix[: -len("text_model.")] if prefix.endswith("text_model.") else prefix
    model_prefix = _clip_model_prefix()
    mapping = {}
    for n in names:
        rel = n[len(prefix):] if n.startswith(prefix) else None
        if rel is not None and not rel.endswith("position_ids"):
            mapping[n] = model_prefix + rel
        elif rel is not None or (n.startswith(outer) and (n[len(outer):] in CLIP_SKIPPED
                                                          or n[len(outer):].startswith("vision_model."))):
            continue  # position_ids buffer, projection heads, the vision tower of a full CLIP
        elif not outer:
            mapping[n] = n  # reported as unexpected
    return mapping


def derive_clip_config(shapes: Mapping[str, tuple], tokenizer=None) -> dict:
    """CLIPTextConfig values from CLIPTextModel shapes (no prefix): the shipped CLIP-L config at full size."""
    p = find_prefix(shapes, CLIP_ANCHOR) or ""
    vocab, hidden = shapes[p + CLIP_ANCHOR]
    derived = dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(shapes, p + "encoder.layers."),
        max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
        num_attention_heads=hidden // 64 if hidden % 64 == 0 else max(1, hidden // 8),
        projection_dim=hidden, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    )
    full = shipped_config("clip")
    if all(full[k] == derived[k] for k in CLIP_SIZE_KEYS):
        return full
    if tokenizer is not None:
        derived.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    else:
        derived.update({k: full[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return derived


def build_clip(state: Mapping[str, torch.Tensor], *, config=None, tokenizer=None, source="<state dict>", load=None):
    """CLIPTextModel from a state dict (real or meta) with file names; ``load(name)`` reads real tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel

    mapping = clip_names(list(state), source)
    checked = {m: state[n] for n, m in mapping.items()}
    cfg = _derive(derive_clip_config, _shapes(checked), source, CLIP_HINT, tokenizer)
    cfg.update(read_config(config))
    return instantiate(lambda: CLIPTextModel(CLIPTextConfig(**cfg)), checked, source, CLIP_WHAT, f"pass {CLIP_HINT}",
                       load=(lambda: {m: load(n) for n, m in mapping.items()}) if load is not None else None)


def load_clip_file(path, *, dtype, config=None, tokenizer=None):
    """CLIP-L ``CLIPTextModel`` from ComfyUI's ``clip_l.safetensors`` (any float dtype, fp8 upcast to ``dtype``)."""
    with Checkpoint(path, CLIP_WHAT, CLIP_HINT) as ckpt:
        clip_names(ckpt.names, ckpt.path, ckpt.wrong_file)
        return build_clip(ckpt.meta_state(), config=config, tokenizer=tokenizer, source=ckpt.path,
                          load=lambda n: ckpt.get(n, dtype))


# ---------------------------------------------------------------------------------------------------------- T5
def t5_names(names: list[str], source: str, wrong_file=None) -> dict[str, str]:
    """{file name: T5EncoderModel name} for a T5 encoder file (``encoder.embed_tokens`` is left to ``shared``)."""
    prefix = find_prefix(names, T5_ANCHOR)
    if prefix is None or find_prefix(names, "encoder.block.0.layer.0.SelfAttention.q.weight") is None:
        if wrong_file is not None:
            raise wrong_file("encoder.block.0.layer.0.SelfAttention.q.weight")
        raise ModelFormatError(f"{source} is not a T5 encoder (no {T5_ANCHOR}); pass {T5_HINT}.")
    have_shared = prefix + "shared.weight" in names
    mapping = {}
    for n in names:
        if not n.startswith(prefix):
            if not prefix:
                mapping[n] = n
            continue
        rel = n[len(prefix):]
        if rel.startswith(("decoder.", "lm_head.")):
            continue  # a full T5 file: only the encoder is used
        if rel == "encoder.embed_tokens.weight":
            if have_shared:
                continue
            rel = "shared.weight"
        mapping[n] = rel
    return mapping


def derive_t5_config(shapes: Mapping[str, tuple]) -> dict:
    """T5Config values from T5EncoderModel shapes: the shipped T5-XXL config at full size."""
    vocab, d_model = shapes["shared.weight"]
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attn + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    layers = _count(shapes, "encoder.block.")
    derived = dict(
        vocab_size=vocab, d_model=d_model, d_kv=shapes[attn + "q.weight"][0] // heads, d_ff=shapes[wi][0],
        num_layers=layers, num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
        layer_norm_epsilon=1e-6, dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    full = shipped_config("t5")
    if all(full[k] == derived[k] for k in T5_SIZE_KEYS):
        return full
    return derived


def build_t5(state: Mapping[str, torch.Tensor], *, config=None, source="<state dict>", load=None):
    """T5EncoderModel from a state dict (real or meta) with file names; ``load(name)`` reads real tensors."""
    from transformers import T5Config, T5EncoderModel

    mapping = t5_names(list(state), source)

    def tie(sd: dict) -> dict:
        if "shared.weight" in sd:
            sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # tied: one tensor, two names
        return sd

    checked = tie({m: state[n] for n, m in mapping.items()})
    cfg = _derive(derive_t5_config, _shapes(checked), source, T5_HINT)
    cfg.update(read_config(config))
    model = instantiate(lambda: T5EncoderModel(T5Config(**cfg)), checked, source, T5_WHAT, f"pass {T5_HINT}",
                        load=(lambda: tie({m: load(n) for n, m in mapping.items()})) if load is not None else None)
    model.encoder.embed_tokens.weight = model.shared.weight  # tied like from_pretrained: one Parameter
    return model


def load_t5_file(path, *, dtype, config=None):
    """T5-XXL ``T5EncoderModel`` from ComfyUI's ``t5xxl_*.safetensors`` (fp16/bf16/fp32, fp8 or scaled fp8).

    As transformers does, the ``wo`` projections stay in float32 when ``dtype`` is float16 (T5 overflows in fp16).
    """
    from transformers import T5EncoderModel

    keep = tuple(T5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()

    def read(name: str) -> torch.Tensor:
        fp32 = any(part in keep for part in name.split("."))
        return ckpt.get(name, torch.float32 if fp32 else dtype)

    with Checkpoint(path, T5_WHAT, T5_HINT) as ckpt:
        t5_names(ckpt.names, ckpt.path, ckpt.wrong_file)
        return build_t5(ckpt.meta_state(), config=config, source=ckpt.path, load=read)
