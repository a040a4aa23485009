"""The DSD transformer from one safetensors file, in diffusers or BFL/ComfyUI layout.

Layouts:

* **diffusers** -- what ``DSDTransformer2DModel.save_pretrained`` writes: ``x_embedder.weight``,
  ``transformer_blocks.N.attn.to_q.weight``, ..., ``c_embedder.weight``; optionally under a prefix
  (e.g. ``transformer.``);
* **BFL/ComfyUI** -- the original FLUX names: ``img_in.weight``, ``double_blocks.N.img_attn.qkv.weight`` (fused
  q|k|v), ``single_blocks.N.linear1.weight`` (fused q|k|v|mlp), ``final_layer.adaLN_modulation.1`` (shift|scale);
  optionally prefixed ``model.diffusion_model.`` (ComfyUI's all-in-one checkpoints, whose other components are
  ignored). ``c_embedder.weight/bias`` may sit under any prefix.

diffusers' own converter (``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes ``inner_dim = 3072`` for the
single-block split, so it only reads full-width models; :func:`bfl_to_diffusers` below is the same mapping with the
sizes taken from the tensors (``tests/test_single_file.py`` checks it against diffusers' converter on the full-size key
set, value by value).

The config is derived from the tensor shapes (layer counts, widths, head size from the q-norm, guidance embedder
present or not); for a full-size file it equals the shipped ``dsd_core/configs/dsd_transformer.json``.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from ..errors import ModelFormatError
from .checkpoint import Checkpoint, find_prefix, instantiate
from ..options import parse_dtype
from .configs import read_config, shipped_config

logger = logging.getLogger(__name__)

WHAT = "DSD transformer"
HINT = ("the DSD transformer file (FLUX.1-dev plus c_embedder, diffusers or BFL/ComfyUI layout; ComfyUI: "
        "models/diffusion_models)")
PLAIN_FLUX_FIX = ("it holds a plain FLUX transformer (no c_embedder weights), not a DSD transformer; use the DSD "
                  "transformer (e.g. primecai/dsd_model's transformer/ saved as one file), or load it with "
                  "DSDTransformer2DModel.from_pretrained(..., init_condition_embedder=True) to train one")

BFL_ANCHOR = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_ANCHOR = "transformer_blocks.0.attn.add_q_proj.weight"
CONDITION_ANCHOR = "c_embedder.weight"

_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "c_embedder": "c_embedder",
}
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """BFL/ComfyUI FLUX names (no prefix) -> diffusers names; sizes from the tensors. Works on meta tensors too.

    Raises :class:`ModelFormatError` naming ``source`` for a tensor that is not part of a FLUX transformer.
    """
    if "img_in.weight" not in state:
        raise ModelFormatError(f"{source} has no img_in.weight, so its hidden size is unknown; pass {HINT}.")
    inner = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, t in state.items():
        m = _BLOCK.match(name)
        if m is None:
            module, _, param = name.rpartition(".")
            if param in ("weight", "bias") and module in _GLOBAL:
                out[f"{_GLOBAL[module]}.{param}"] = t
            elif param in ("weight", "bias") and module == _FINAL_MODULATION:
                shift, scale = t.chunk(2, dim=0)
                out[f"norm_out.linear.{param}"] = torch.cat([scale, shift], dim=0)
            else:
                unexpected.append(name)
            continue
        kind, index, rest = m.groups()
        module, _, param = rest.rpartition(".")
        if kind == "double_blocks":
            base = f"transformer_blocks.{index}."
            if rest in _DOUBLE_NORMS:
                out[base + _DOUBLE_NORMS[rest]] = t
            elif param in ("weight", "bias") and module in _DOUBLE:
                out[f"{base}{_DOUBLE[module]}.{param}"] = t
            elif param in ("weight", "bias") and module in _DOUBLE_QKV:
                for target, part in zip(_DOUBLE_QKV[module], t.chunk(3, dim=0)):
                    out[f"{base}{target}.{param}"] = part
            else:
                unexpected.append(name)
        else:
            base = f"single_transformer_blocks.{index}."
            if rest in _SINGLE_NORMS:
                out[base + _SINGLE_NORMS[rest]] = t
            elif param in ("weight", "bias") and module in _SINGLE:
                out[f"{base}{_SINGLE[module]}.{param}"] = t
            elif param in ("weight", "bias") and module == "linear1":
                mlp = t.shape[0] - 3 * inner
                if mlp <= 0:
                    raise ModelFormatError(f"{source}: {name} has {t.shape[0]} rows, too few for q, k, v of width "
                                           f"{inner} plus an MLP; the file is not a FLUX transformer.")
                for target, part in zip(_SINGLE_LINEAR1, t.split([inner, inner, inner, mlp], dim=0)):
                    out[f"{base}{target}.{param}"] = part
            else:
                unexpected.append(name)
    if unexpected:
        raise ModelFormatError(f"{source} has {len(unexpected)} tensors that are not part of a FLUX transformer "
                               f"(e.g. {unexpected[0]}); pass {HINT}.")
    return out


def plan_names(names: list[str], source: str, wrong_file=None) -> tuple[str, dict[str, str]]:
    """(layout, {file name: name without prefix}) for a DSD transformer file; errors for wrong or plain-FLUX files."""
    bfl = find_prefix(names, BFL_ANCHOR)
    diffusers = find_prefix(names, DIFFUSERS_ANCHOR)
    if bfl is None and diffusers is None:
        if wrong_file is not None:
            raise wrong_file(BFL_ANCHOR)
        raise ModelFormatError(f"{source} is not a FLUX transformer (no {BFL_ANCHOR} or {DIFFUSERS_ANCHOR}); "
                               f"pass {HINT}.")
    layout, prefix = ("bfl", bfl) if bfl is not None else ("diffusers", diffusers)
    conditions = [n for n in names if n == CONDITION_ANCHOR or n.endswith("." + CONDITION_ANCHOR)]
    if not conditions:
        raise ModelFormatError(f"{source}: {PLAIN_FLUX_FIX}.")
    if len(conditions) > 1:
        raise ModelFormatError(f"{source} has {len(conditions)} c_embedder weights ({', '.join(conditions[:3])}); "
                               "keep one DSD transformer per file.")
    c_prefix = conditions[0][: -len(CONDITION_ANCHOR)]
    mapping, ignored = {}, 0
    for n in names:
        if n.startswith(c_prefix + "c_embedder."):
            mapping[n] = n[len(c_prefix):]
        elif n.startswith(prefix):
            mapping[n] = n[len(prefix):]
        else:
            ignored += 1
    if ignored:
        logger.info("%s: ignoring %d tensors outside %r (other components of an all-in-one checkpoint)", source,
                    ignored, prefix)
    return layout, mapping


def to_diffusers(state: Mapping[str, torch.Tensor], layout: str, source: str) -> dict[str, torch.Tensor]:
    return bfl_to_diffusers(state, source) if layout == "bfl" else dict(state)


def _count(names, prefix: str) -> int:
    found = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    return max(found) + 1 if found else 0


def rope_axes(head_dim: int) -> list[int]:
    """FLUX's (16, 56, 56) for head size 128; (d/4, 3d/8, 3d/8) with even parts otherwise (test models)."""
    full = shipped_config("transformer")
    if head_dim == full["attention_head_dim"]:
        return list(full["axes_dims_rope"])
    first = max(2, (head_dim // 4) // 2 * 2)
    half = (head_dim - first) // 2 // 2 * 2
    return [head_dim - 2 * half, half, half]


def derive_config(shapes: Mapping[str, tuple]) -> dict:
    """The DSDTransformer2DModel config implied by a diffusers-layout state dict's shapes."""
    try:
        inner, in_channels = shapes["x_embedder.weight"]
        norm_q = "transformer_blocks.0.attn.norm_q.weight"
        if norm_q not in shapes:
            norm_q = "single_transformer_blocks.0.attn.norm_q.weight"
        head_dim = shapes[norm_q][0]
        out_channels = shapes["proj_out.weight"][0]
        config = dict(
            patch_size=1,
            in_channels=in_channels,
            out_channels=None if out_channels == in_channels else out_channels,
            num_layers=_count(shapes, "transformer_blocks."),
            num_single_layers=_count(shapes, "single_transformer_blocks."),
            attention_head_dim=head_dim,
            num_attention_heads=inner // head_dim,
            joint_attention_dim=shapes["context_embedder.weight"][1],
            pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
            axes_dims_rope=rope_axes(head_dim),
        )
    except KeyError as e:
        raise ModelFormatError(f"missing {e.args[0]}") from None
    return config


def transformer_config(state: Mapping[str, torch.Tensor], config, source: str) -> dict:
    """Derived config (from shapes) updated with ``config`` (a dict, config.json or its folder)."""
    try:
        derived = derive_config({k: tuple(v.shape) for k, v in state.items()})
    except ModelFormatError as e:
        raise ModelFormatError(f"{source} is not a complete FLUX transformer ({e}); pass {HINT}.") from None
    derived.update(read_config(config))
    return derived


def build_from_state(state: Mapping[str, torch.Tensor], *, config=None, source: str = "<state dict>",
                     load=None):
    """A DSDTransformer2DModel from a state dict in either layout (real or meta tensors).

    ``load(name) -> tensor`` reads the real tensors after keys and shapes were checked on ``state`` (used by the file
    loader so that nothing is read from a wrong file); without it ``state`` itself is assigned.
    """
    from ..transformer import DSDTransformer2DModel

    layout, mapping = plan_names(list(state), source)
    checked = to_diffusers({rel: state[name] for name, rel in mapping.items()}, layout, source)
    cfg = transformer_config(checked, config, source)

    def real() -> dict[str, torch.Tensor]:
        return to_diffusers({rel: load(name) for name, rel in mapping.items()}, layout, source)

    return instantiate(lambda: DSDTransformer2DModel(**cfg), checked, source, WHAT, f"pass {HINT}",
                       load=real if load is not None else None)


def load_dsd_transformer_file(path, *, dtype, config=None):
    """Load a DSD transformer (FLUX.1-dev + ``c_embedder``) from ONE safetensors file.

    Args:
        path: the file, in diffusers layout (``save_pretrained`` keys) or BFL/ComfyUI layout (``double_blocks...``,
            optionally prefixed ``model.diffusion_model.``), bf16/fp16/fp32 or fp8 (plain or ComfyUI-scaled).
        dtype: compute dtype; fp8 weights are upcast (dequantised) to it.
        config: optional overrides of the config derived from the tensor shapes (dict, config.json or its folder).

    Raises:
        ModelNotFoundError: the file does not exist.
        ModelFormatError: not a FLUX transformer (names what it is), no ``c_embedder`` (plain FLUX), or keys/shapes
            that do not match -- one line naming the file and the fix.
    """
    dtype = parse_dtype(dtype)
    with Checkpoint(path, WHAT, HINT) as ckpt:
        layout, _ = plan_names(ckpt.names, ckpt.path, ckpt.wrong_file)
        model = build_from_state(ckpt.meta_state(), config=config, source=ckpt.path,
                                 load=lambda name: ckpt.get(name, dtype))
        logger.info("loaded the DSD transformer from %s (%s layout%s)", ckpt.path, layout,
                    ", fp8 upcast to " + str(dtype).removeprefix("torch.") if ckpt.fp8 else "")
    return model
