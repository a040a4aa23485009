"""Applying a :class:`~dsd_core.memory.MemoryConfig`: loading the transformer in its storage format, fusing the LoRA,
fp8 casting, offload, and the per-call part (releasing the text encoders, offloading idle components). Everything
here is diffusers/accelerate/torchao/bitsandbytes features wired together; the only own code is the choice of layers
kept in full precision.

Order in :func:`dsd_core.assembly.build_pipeline`: :func:`load_transformer` -> pipeline -> LoRA ->
:func:`apply_memory` (fuse LoRA -> fp8 casting -> offload / placement -> :class:`MemoryHook`).
"""

from __future__ import annotations

import gc
import logging
import re

import torch

from ..errors import DSDError, InputError, ModelNotFoundError
from ..hooks import CallHook
from .config import MemoryConfig

logger = logging.getLogger(__name__)

#: Transformer modules kept in the compute dtype under fp8 storage (regexes searched in module names): the small,
#: precision-critical embedders and output layers, and the LoRA's own layers. Everything else that is an
#: ``nn.Linear`` -- attention, MLPs and the AdaLN modulation linears, 99.5 % of the weights -- is stored in fp8.
#: (diffusers' default skip list also keeps every ``norm*.linear`` AdaLN layer in bf16: 3.25 B parameters, 6 GiB.)
FP8_KEEP_TRANSFORMER = ("pos_embed", "x_embedder", "c_embedder", "context_embedder", "time_text_embed", "norm_out",
                        "^proj_out$", "lora_", "norm_q", "norm_k", "norm_added")
#: Text-encoder modules kept in the compute dtype under fp8 storage: embeddings and norms (only linears are fp8).
FP8_KEEP_TEXT = ("shared", "embed_tokens", "embeddings", "relative_attention_bias", "layer_norm", "layernorm",
                 "lora_")
#: T5's feed-forward casts its input to ``wo.weight.dtype`` before calling ``wo``, which would be fp8; these modules
#: are therefore cast as one unit (wi_0, wi_1 and wo upcast together) instead of linear by linear.
FP8_TEXT_UNITS = ("DenseReluDense",)
FP8_DTYPE = torch.float8_e4m3fn
#: torchao group size for int4 (weights and scales per 64 input channels; 32 for models too narrow for 64).
INT4_GROUP = 64


# ---------------------------------------------------------------------------------------------- availability
def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def require_torchao(what: str):
    try:
        import torchao  # noqa: F401
        from diffusers import TorchAoConfig  # noqa: F401
    except ImportError:
        raise DSDError(f"{what} needs torchao: `pip install torchao` (or pick the '12gb' preset, fp8, which needs "
                       "nothing extra).") from None


def require_nf4(device):
    if not _is_cuda(device) or not torch.cuda.is_available():
        raise DSDError(f"transformer_weights='nf4' (bitsandbytes 4-bit) needs a CUDA GPU, and the device is "
                       f"{device or 'cpu'}; pick transformer_weights='int4' (torchao) or 'gguf', or the '12gb' preset.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DSDError("transformer_weights='nf4' needs bitsandbytes: `pip install bitsandbytes` (or pick "
                       "transformer_weights='gguf' or the '12gb' preset).") from None


def _int4_group(transformer_dir) -> int:
    """64, or 32 when a linear's input size is not a multiple of 64 (tiny test models)."""
    import json
    import os

    try:
        with open(os.path.join(transformer_dir, "config.json"), encoding="utf-8") as f:
            c = json.load(f)
        dims = [c["num_attention_heads"] * c["attention_head_dim"], c["joint_attention_dim"],
                c["pooled_projection_dim"], c["in_channels"]]
    except (OSError, KeyError, TypeError, ValueError):
        return INT4_GROUP
    return INT4_GROUP if all(d % INT4_GROUP == 0 for d in dims) else 32


def check_available(cfg: MemoryConfig, device) -> None:
    """Fail before any download if ``cfg`` needs a package or a device that is missing (one-line errors)."""
    import os

    if cfg.transformer_weights == "nf4":
        require_nf4(device)
    elif cfg.transformer_weights in ("int8", "int4"):
        require_torchao(f"transformer_weights={cfg.transformer_weights!r}")
    elif cfg.transformer_weights == "gguf":
        from .gguf import require_gguf

        require_gguf()
        if not os.path.isfile(cfg.gguf_file):
            raise ModelNotFoundError(f"GGUF file {cfg.gguf_file} does not exist; pass the DSD transformer's .gguf file.")


def quantization_config(cfg: MemoryConfig, dtype: torch.dtype, device, transformer_dir=None):
    """The diffusers ``quantization_config`` for the transformer (``None`` for native / fp8 / gguf)."""
    w = cfg.transformer_weights
    if w == "nf4":
        require_nf4(device)
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    if w in ("int8", "int4"):
        require_torchao(f"transformer_weights={w!r}")
        import torchao.quantization as tq
        from diffusers import TorchAoConfig

        if w == "int8":
            return TorchAoConfig(tq.Int8WeightOnlyConfig())
        group = _int4_group(transformer_dir) if transformer_dir else INT4_GROUP
        if _is_cuda(device):
            if dtype != torch.bfloat16:
                raise DSDError("transformer_weights='int4' on CUDA needs dtype bfloat16 (torchao's int4 kernel).")
            return TorchAoConfig(tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
        logger.warning("int4 on %s: torchao has no packed int4 layout for this device, so the 4-bit values are stored "
                       "one per byte (memory of int8, numerics of int4). Use a CUDA GPU for 4-bit memory.", device)
        return TorchAoConfig(tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(group)))
    return None


# ---------------------------------------------------------------------------------------------- transformer
def load_transformer(cfg: MemoryConfig, parts, dtype: torch.dtype, device=None):
    """The DSD transformer in the storage format of ``cfg`` (fp8 casting happens later, after the LoRA).

    ``parts`` is what a model source resolved to (:mod:`dsd_core.sources`): it loads its transformer with a
    diffusers ``quantization_config`` (int8, int4, nf4; ``None`` for native and fp8), and for a config that brings
    its own weights (a GGUF file) it provides only the transformer config (or ``None``: derived from the tensors).
    """
    if cfg.transformer_file is not None:  # the GGUF quant replaces the source's transformer weights
        from .gguf import load_gguf_transformer

        return load_gguf_transformer(cfg.transformer_file, dtype=dtype, config=parts.transformer_config)
    qc = quantization_config(cfg, dtype, device, parts.transformer_config)
    return parts.load_transformer(dtype, qc)  # a quantizer may replace x_embedder: the model re-attaches its hook


def cast_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, keep: tuple[str, ...],
             units: tuple[str, ...] = ()) -> None:
    """Store ``module``'s linear weights as float8_e4m3fn, upcast to ``compute_dtype`` layer by layer when used.

    diffusers' layerwise casting (``apply_layerwise_casting``) with our own list of layers to keep; submodules whose
    name ends with one of ``units`` are cast as a whole (one hook for all their weights).
    """
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    unit_modules = [(n, m) for n, m in module.named_modules() if units and n.endswith(units)]
    apply_layerwise_casting(module, storage_dtype=FP8_DTYPE, compute_dtype=compute_dtype,
                            skip_modules_pattern=tuple(keep) + tuple(f"{u}$" for u in units),
                            skip_modules_classes=None, non_blocking=False)
    for name, unit in unit_modules:
        if not is_kept(name, keep):
            apply_layerwise_casting_hook(unit, FP8_DTYPE, compute_dtype, non_blocking=False)
    with torch.no_grad():  # drop the last views of the memory-mapped checkpoint, so its pages can be unmapped
        for p in module.parameters():
            if p.device.type == "cpu" and p.dtype != FP8_DTYPE:
                p.data = p.data.clone()


def is_kept(name: str, keep: tuple[str, ...]) -> bool:
    """Whether module ``name`` is kept in the compute dtype by :func:`cast_fp8` (the same test diffusers uses)."""
    parts = name.split(".")
    return any(re.search(p, ".".join(parts[:i])) for p in keep for i in range(1, len(parts) + 1))


def fuse_lora(pipe) -> bool:
    """Merge the loaded LoRA adapters into the transformer weights and drop the adapter layers (diffusers)."""
    if not getattr(pipe.transformer, "peft_config", None):
        return False
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return True


# ---------------------------------------------------------------------------------------------- whole pipeline
def apply_memory(pipe, cfg: MemoryConfig, device, allow_cpu_offload: bool = False) -> None:
    """Apply ``cfg`` to a loaded pipeline (LoRA already loaded), place it on ``device``, and install its per-call
    part as the pipeline's ``"memory"`` hook (:class:`MemoryHook`).

    On the CPU, offload has nothing to save and is skipped with a warning unless ``allow_cpu_offload`` (tests use it
    to run the offload hooks on the CPU).
    """
    dtype = pipe.transformer.dtype
    if cfg.fuse_lora and fuse_lora(pipe):
        logger.info("fused the LoRA into the transformer weights")
    if cfg.transformer_weights == "fp8":
        cast_fp8(pipe.transformer, dtype, FP8_KEEP_TRANSFORMER)
    if cfg.text_encoder_weights == "fp8":
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                cast_fp8(encoder, encoder.dtype, FP8_KEEP_TEXT, FP8_TEXT_UNITS)
    offload = place(pipe, cfg, device, allow_cpu_offload)
    hook = MemoryHook(cfg.release_text_encoders, model_offload=offload == "model")
    pipe.set_call_hook("memory", hook if hook.active else None)


def place(pipe, cfg: MemoryConfig, device, allow_cpu_offload: bool = False) -> str:
    """Move the pipeline to ``device`` or install the offload of ``cfg``; returns the offload mode installed."""
    offload = cfg.offload
    if offload == "none":
        pipe.to(device)
        return "none"
    if str(device).startswith("cpu") and not allow_cpu_offload:
        logger.warning("offload=%r has no effect on the CPU; running without offload.", offload)
        return "none"
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        group_offload(pipe, device, cfg.group_offload_blocks, cfg.group_offload_streams)
    return offload


def group_offload(pipe, device, blocks_per_group: int = 1, streams: bool | None = None) -> None:
    """diffusers group offload: the transformer block by block, text encoders and VAE layer by layer.

    (Block level would move a whole T5 at once: its blocks sit in a nested list that block level does not split.)
    """
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(device)
    if streams is None:
        streams = onload.type == "cuda"
    common = dict(onload_device=onload, offload_device=torch.device("cpu"), use_stream=streams, non_blocking=streams)
    pipe.transformer.enable_group_offload(offload_type="block_level", num_blocks_per_group=blocks_per_group, **common)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            apply_group_offloading(module, offload_type="leaf_level", **common)


# ---------------------------------------------------------------------------------------------- per call
class MemoryHook(CallHook):
    """The per-call part of a memory config.

    * ``release_text_encoders``: encoded prompts are kept; before the first denoising loop the prompts of the call
      (the negative one too, for later true-guidance runs) are encoded and the text encoders freed. A new prompt
      afterwards is an error that says to load again.
    * ``model_offload``: before the loop every component goes back to the CPU (diffusers'
      ``maybe_free_model_hooks``), so only the transformer is on the GPU while denoising (the offload chain would
      keep the VAE there).
    """

    def __init__(self, release_text_encoders: bool = False, model_offload: bool = False):
        self.release_text_encoders = release_text_encoders
        self.model_offload = model_offload
        self.released = False
        self._encoded: dict[tuple, tuple] = {}

    @property
    def active(self) -> bool:
        return self.release_text_encoders or self.model_offload

    def encode(self, key, compute):
        if not self.release_text_encoders:
            return compute()
        if key not in self._encoded:
            if self.released:
                raise released_error(key[0])
            self._encoded[key] = compute()
        return self._encoded[key]

    def before_denoising(self, pipe, prompts, encode):
        if self.release_text_encoders and not self.released:
            for prompt in prompts:
                encode(prompt)
            release_text_encoders(pipe, self.model_offload)
            self.released = True
        elif self.model_offload:
            pipe.maybe_free_model_hooks()


def release_text_encoders(pipe, model_offload: bool = False) -> None:
    """Drop the text encoders (device and host memory); under model offload the hook chain, which holds them, is
    rebuilt without them (and every component sent to the CPU)."""
    pipe.register_modules(text_encoder=None, text_encoder_2=None)
    if model_offload:
        pipe.maybe_free_model_hooks()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("released the text encoders; new prompts need the pipeline loaded again")


def released_error(prompt: str) -> InputError:
    return InputError(f"the text encoders were released after the first prompt (release_text_encoders), so the new "
                      f"prompt {prompt[:40]!r} cannot be encoded; load the pipeline again, or keep the encoders.")
