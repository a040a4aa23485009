"""Test helpers: diffusers -> BFL/ComfyUI converters (the inverse of what the loader reads) and file writers.

Written independently of ``dsd_core.single_file`` from the BFL names: the transformer's fused ``qkv`` and
``linear1 = q|k|v|mlp``, ``final_layer.adaLN_modulation.1`` as (shift, scale); the VAE's ``down.N.block.M``,
``mid.block_1/2``, ``mid.attn_1`` with 1x1-conv q/k/v/proj_out, ``up.N`` in reverse order, ``nin_shortcut``,
``norm_out``. Work on real and meta tensors.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


# ------------------------------------------------------------------------------------------------ transformer
def transformer_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "", condition_prefix: str | None = None) -> dict:
    """diffusers DSD transformer state dict -> BFL/ComfyUI names (``condition_prefix`` defaults to ``prefix``)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(name):
        return sd.pop(name)

    def pair(src, dst):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = take(f"{src}.{p}")

    pair("x_embedder", "img_in")
    pair("context_embedder", "txt_in")
    pair("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    pair("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    pair("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    pair("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        pair("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        pair("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    pair("proj_out", "final_layer.linear")
    for p in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)
    doubles = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in doubles:
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        pair(s + "norm1.linear", d + "img_mod.lin")
        pair(s + "norm1_context.linear", d + "txt_mod.lin")
        for p in ("weight", "bias"):
            out[f"{d}img_attn.qkv.{p}"] = torch.cat([take(f"{s}attn.to_{x}.{p}") for x in "qkv"], dim=0)
            out[f"{d}txt_attn.qkv.{p}"] = torch.cat([take(f"{s}attn.add_{x}_proj.{p}") for x in "qkv"], dim=0)
        out[d + "img_attn.norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "img_attn.norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        out[d + "txt_attn.norm.query_norm.scale"] = take(s + "attn.norm_added_q.weight")
        out[d + "txt_attn.norm.key_norm.scale"] = take(s + "attn.norm_added_k.weight")
        pair(s + "attn.to_out.0", d + "img_attn.proj")
        pair(s + "attn.to_add_out", d + "txt_attn.proj")
        pair(s + "ff.net.0.proj", d + "img_mlp.0")
        pair(s + "ff.net.2", d + "img_mlp.2")
        pair(s + "ff_context.net.0.proj", d + "txt_mlp.0")
        pair(s + "ff_context.net.2", d + "txt_mlp.2")
    singles = sorted({int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in singles:
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        pair(s + "norm.linear", d + "modulation.lin")
        for p in ("weight", "bias"):
            out[f"{d}linear1.{p}"] = torch.cat([take(f"{s}attn.to_{x}.{p}") for x in "qkv"]
                                               + [take(f"{s}proj_mlp.{p}")], dim=0)
        out[d + "norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        out[d + "norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
        pair(s + "proj_out", d + "linear2")
    condition = {k: sd.pop(k) for k in [k for k in sd if k.startswith("c_embedder.")]}
    assert not sd, f"unconverted keys: {sorted(sd)[:5]}"
    cp = prefix if condition_prefix is None else condition_prefix
    return {prefix + k: v for k, v in out.items()} | {cp + k: v for k, v in condition.items()}


# ------------------------------------------------------------------------------------------------ VAE
def vae_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> BFL ``ae.safetensors`` names (attention weights as 1x1 convs)."""
    ups = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{ups - 1 - int(m.group(1))}.block.{m.group(2)}.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{ups - 1 - int(m.group(1))}.upsample.", n)
        n = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                   lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", n)
        if m:
            part = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
            module, _, param = m.group(2).rpartition(".")
            n = f"{m.group(1)}.mid.attn_1.{part[module]}.{param}"
            if param == "weight" and module != "group_norm":
                v = v[:, :, None, None]
        out[n] = v
    return out


# ------------------------------------------------------------------------------------------------ writing
def to_fp8(sd: dict[str, torch.Tensor], rest: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Plain fp8: 2-D weights stored as float8_e4m3fn (clamped to its range), everything else in ``rest``."""
    return {k: (v.clamp(-FP8_MAX, FP8_MAX).to(FP8) if v.ndim == 2 and k.endswith("weight") else v.to(rest))
            for k, v in sd.items()}


def to_scaled_fp8(sd: dict[str, torch.Tensor], rest: torch.dtype = torch.bfloat16,
                  prefix: str = "") -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled fp8: ``w = fp8 * scale_weight`` per tensor, a ``scaled_fp8`` marker, ``scale_input``."""
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            layer = k[: -len(".weight")]
            scale = (v.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
            out[k] = (v.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            out[layer + ".scale_weight"] = scale.reshape(())
            out[layer + ".scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[k] = v.to(rest)
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def to_comfy_quant_fp8(sd: dict[str, torch.Tensor], rest: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """ComfyUI's current per-layer format: ``<layer>.weight_scale`` plus a ``<layer>.comfy_quant`` JSON (uint8)."""
    import json

    out = {}
    for k, v in to_scaled_fp8(sd, rest).items():
        if k == "scaled_fp8" or k.endswith(".scale_input"):
            continue
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            out[layer + ".weight_scale"] = v
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
        else:
            out[k] = v
    return out


def write(path, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None, metadata: dict | None = None) -> str:
    """Save contiguous, optionally cast copies (each tensor its own storage, as safetensors requires)."""
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().clone()
               for k, v in sd.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return str(path)
