"""Build the DSD pipeline from the single files ComfyUI users already have -- offline, nothing fetched.

::

    from dsd_core import load_pipeline
    from dsd_core.sources import FilesSource

    pipe = load_pipeline(source=FilesSource(
        "models/diffusion_models/dsd_transformer.safetensors",   # diffusers or BFL/ComfyUI layout, bf16 or fp8
        "models/text_encoders/clip_l.safetensors",
        "models/text_encoders/t5xxl_fp16.safetensors",           # or t5xxl_fp8_e4m3fn(_scaled).safetensors
        "models/vae/ae.safetensors",
        lora="models/loras/dsd_lora.safetensors",
        tokenizers="/path/to/ComfyUI",                           # or {"clip": DIR, "t5": DIR}
    ), dtype="bfloat16", device="cuda")

This package holds the file readers and converters; :class:`dsd_core.sources.FilesSource` uses them.

* configs: the shipped full-size JSON in ``dsd_core/configs/`` when the tensor shapes are the real models', otherwise
  derived from the shapes (tiny test models); ``configs=`` overrides either;
* weights: keys and shapes are checked from the safetensors header against an empty (meta) model before any data is
  read; then tensors are read one by one (``safe_open``, never ``torch.load``), cast/dequantised and assigned into
  the model -- the weights exist once, plus at most one tensor in flight;
* layouts: VAE via diffusers' ``convert_ldm_vae_checkpoint``; transformer via :func:`bfl_to_diffusers` (diffusers'
  FLUX converter hard-codes the full width);
* tokenizers: see :mod:`dsd_core.single_file.tokenizers`.

Every problem is one line that names the file and the fix (:class:`~dsd_core.errors.ModelNotFoundError`,
:class:`~dsd_core.errors.ModelFormatError`).
"""

from __future__ import annotations

import logging

from ..errors import DSDError, ModelFormatError
from ..options import parse_dtype
from .checkpoint import Checkpoint, check_file, describe_keys
from .configs import CONFIG_DIR, shipped_config
from .text_encoders import CLIP_HINT, CLIP_WHAT, T5_HINT, T5_WHAT, load_clip_file, load_t5_file
from .tokenizers import comfy_tokenizer_dirs, load_tokenizers, resolve_tokenizer_dirs
from .transformer import HINT as TRANSFORMER_HINT
from .transformer import WHAT as TRANSFORMER_WHAT
from .transformer import bfl_to_diffusers, load_dsd_transformer_file
from .vae import HINT as VAE_HINT
from .vae import WHAT as VAE_WHAT
from .vae import load_vae_file

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR", "Checkpoint", "TRANSFORMER_HINT", "TRANSFORMER_WHAT", "bfl_to_diffusers", "check_file", "check_fit",
    "comfy_tokenizer_dirs", "describe_keys", "load_clip_file", "load_components_from_files",
    "load_dsd_transformer_file", "load_t5_file", "load_tokenizers", "load_vae_file", "make_scheduler",
    "resolve_tokenizer_dirs", "shipped_config",
]

_CONFIG_KEYS = ("clip", "t5", "vae")


def make_scheduler():
    """FLUX.1-dev's FlowMatchEulerDiscreteScheduler from the shipped config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(shipped_config("scheduler"))


def _check_vocab(tokenizer, model, tokenizer_dir: str, path: str, name: str) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ModelFormatError(f"the {name} tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but {path} embeds "
                               f"only {model.config.vocab_size}; the tokenizer does not belong to this text encoder.")


def check_fit(transformer, components: dict, transformer_path: str, clip_l: str, t5xxl: str) -> None:
    """The text encoders must produce what the transformer reads (CLIP-L pooled 768, T5-XXL 4096 at full size)."""
    pooled, joint = transformer.config.pooled_projection_dim, transformer.config.joint_attention_dim
    clip_width = components["text_encoder"].config.hidden_size
    t5_width = components["text_encoder_2"].config.d_model
    if clip_width != pooled:
        raise ModelFormatError(f"{clip_l} is a CLIP text encoder of width {clip_width}, but {transformer_path} reads "
                               f"{pooled}; FLUX needs CLIP-L: pass {CLIP_HINT}.")
    if t5_width != joint:
        raise ModelFormatError(f"{t5xxl} is a T5 encoder of width {t5_width}, but {transformer_path} reads {joint}; "
                               f"FLUX needs T5-XXL: pass {T5_HINT}.")


def load_components_from_files(clip_l, t5xxl, vae, *, dtype, tokenizer_dirs=None, comfy_root=None, configs=None,
                               search_tokenizers: bool = True) -> dict:
    """Everything but the transformer, ready for ``DSDPipeline(transformer=..., **components)``.

    Args:
        clip_l: ``clip_l.safetensors`` (Hugging Face CLIPTextModel keys).
        t5xxl: ``t5xxl_fp16.safetensors`` or ``t5xxl_fp8_e4m3fn(_scaled).safetensors`` (T5EncoderModel keys).
        vae: ``ae.safetensors`` (BFL layout) or a diffusers-layout FLUX VAE file.
        dtype: compute dtype (``torch.bfloat16``, ``"float32"``, ...); fp8 weights are upcast to it.
        tokenizer_dirs, comfy_root, search_tokenizers: where the tokenizers come from
            (:func:`~dsd_core.single_file.tokenizers.resolve_tokenizer_dirs`).
        configs: optional overrides ``{"clip"|"t5"|"vae": dict or config.json}`` of the shipped/derived configs.

    Returns:
        ``dict(text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae, scheduler)``.
    """
    dtype = parse_dtype(dtype)
    configs = dict(configs or {})
    unknown = set(configs) - set(_CONFIG_KEYS)
    if unknown:
        raise DSDError(f"configs has unknown keys {sorted(unknown)}; use {', '.join(_CONFIG_KEYS)}.")
    clip_l = check_file(clip_l, CLIP_WHAT, CLIP_HINT)  # every file is checked before anything is read
    t5xxl = check_file(t5xxl, T5_WHAT, T5_HINT)
    vae = check_file(vae, VAE_WHAT, VAE_HINT)
    dirs = resolve_tokenizer_dirs(tokenizer_dirs, comfy_root=comfy_root, search=search_tokenizers)
    tokenizer, tokenizer_2 = load_tokenizers(dirs, search=False)
    text_encoder = load_clip_file(clip_l, dtype=dtype, config=configs.get("clip"), tokenizer=tokenizer)
    _check_vocab(tokenizer, text_encoder, dirs["clip"], clip_l, "CLIP-L")
    text_encoder_2 = load_t5_file(t5xxl, dtype=dtype, config=configs.get("t5"))
    _check_vocab(tokenizer_2, text_encoder_2, dirs["t5"], t5xxl, "T5-XXL")
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                tokenizer_2=tokenizer_2, vae=load_vae_file(vae, dtype=dtype, config=configs.get("vae")),
                scheduler=make_scheduler())
