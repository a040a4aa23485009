"""Build the DSD pipeline from the single files ComfyUI users already have -- offline, nothing fetched.

::

    from dsd_core.single_file import load_pipeline_from_files

    pipe = load_pipeline_from_files(
        "models/diffusion_models/dsd_transformer.safetensors",   # diffusers or BFL/ComfyUI layout, bf16 or fp8
        "models/text_encoders/clip_l.safetensors",
        "models/text_encoders/t5xxl_fp16.safetensors",           # or t5xxl_fp8_e4m3fn(_scaled).safetensors
        "models/vae/ae.safetensors",
        lora="models/loras/dsd_lora.safetensors",
        dtype="bfloat16", device="cuda",
        tokenizer_dirs="/path/to/ComfyUI",                       # or {"clip": DIR, "t5": DIR}
    )

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
from .checkpoint import Checkpoint, check_file, describe_keys
from .configs import CONFIG_DIR, as_dtype, shipped_config
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
    "CONFIG_DIR", "Checkpoint", "bfl_to_diffusers", "comfy_tokenizer_dirs", "describe_keys", "load_clip_file",
    "load_components_from_files", "load_dsd_transformer_file", "load_pipeline_from_files", "load_t5_file",
    "load_tokenizers", "load_vae_file", "make_scheduler", "resolve_tokenizer_dirs", "shipped_config",
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


def _check_fit(transformer, components: dict, transformer_path: str, clip_l: str, t5xxl: str) -> None:
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
    dtype = as_dtype(dtype)
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


def load_pipeline_from_files(transformer, clip_l, t5xxl, vae, lora=None, *, dtype=None, device=None,
                             tokenizer_dirs=None, comfy_root=None, configs=None, transformer_config=None,
                             offload: str | None = None, memory=None, speed=None, search_tokenizers: bool = True):
    """A ready :class:`~dsd_core.DSDPipeline` from single files: DSD transformer, CLIP-L, T5-XXL, VAE (+ LoRA).

    Args:
        transformer: the DSD transformer, one safetensors file (:func:`load_dsd_transformer_file`), or a GGUF quant
            of it (``.gguf``; :func:`dsd_core.memory.load_gguf_transformer`).
        clip_l, t5xxl, vae, tokenizer_dirs, comfy_root, configs: as in :func:`load_components_from_files`.
        lora: the DSD LoRA (``.safetensors``), loaded unfused with ``pipe.load_dsd_lora``; None for none.
        dtype: default bfloat16 on accelerators, float32 on CPU.
        device: default the best available (cuda, mps, cpu).
        transformer_config: overrides of the transformer config derived from its shapes.
        offload, memory, speed: as :func:`dsd_core.loading.load_pipeline`. Weight formats that are chosen at load time
            from a folder (int8, int4, nf4) are not available here; fp8 storage, LoRA fusing, offload and GGUF files
            are.
    """
    import os

    from ..loading import default_device, resolve_dtype
    from ..memory.apply import apply_memory, check_available
    from ..memory.config import resolve_memory
    from ..pipeline import DSDPipeline
    from ..speed import apply_speed, resolve_speed

    from ..validation import check_device

    check_device(device)
    device = device or default_device()
    dtype = resolve_dtype(None, device) if dtype is None else as_dtype(dtype)
    gguf = str(transformer).lower().endswith(".gguf")
    memory = resolve_memory(memory, offload)
    if gguf and memory.transformer_weights not in ("native", "gguf"):
        raise DSDError(f"{transformer} is a GGUF quant; it cannot also be stored as {memory.transformer_weights}. "
                       "Pick a memory setting with native weights.")
    if memory.transformer_weights in ("int8", "int4", "nf4"):
        raise DSDError(f"{memory.transformer_weights} weights are made while loading a transformer folder; with "
                       "single files use fp8, a GGUF quant, or the folder loader (dsd_core.load_pipeline).")
    if gguf:
        memory = memory.replace(transformer_weights="gguf", gguf_file=os.fspath(transformer))
    speed = resolve_speed(speed)
    check_available(memory, device)
    if not gguf:
        transformer = check_file(transformer, TRANSFORMER_WHAT, TRANSFORMER_HINT)
    if lora is not None:
        lora = check_file(lora, "DSD LoRA", "the DSD LoRA (pytorch_lora_weights.safetensors)")
        if not gguf:  # the LoRA's header against the transformer file's, before anything loads
            from ..validation import check_lora_for_transformer_file

            check_lora_for_transformer_file(lora, transformer)
    components = load_components_from_files(clip_l, t5xxl, vae, dtype=dtype, tokenizer_dirs=tokenizer_dirs,
                                            comfy_root=comfy_root, configs=configs,
                                            search_tokenizers=search_tokenizers)
    if gguf:
        from ..memory.gguf import load_gguf_transformer

        dit = load_gguf_transformer(memory.gguf_file, dtype=dtype, config=transformer_config)
    else:
        dit = load_dsd_transformer_file(transformer, dtype=dtype, config=transformer_config)
    _check_fit(dit, components, transformer, clip_l, t5xxl)
    pipe = DSDPipeline(transformer=dit, **components)
    if lora is not None:
        pipe.load_dsd_lora(lora)
    apply_memory(pipe, memory, device)
    apply_speed(pipe, speed)
    return pipe
