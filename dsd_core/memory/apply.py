"""Applying a :class:`~dsd_core.memory.MemoryConfig`: loading the transformer in its storage format, fusing the LoRA,
fp8 casting, offload, and releasing the text encoders. Everything here is diffusers/accelerate/torchao/bitsandbytes
features wired together; the only own code is the choice of layers kept in full precision.

Order in :func:`dsd_core.loading.load_pipeline`: :func:`load_transformer` -> pipeline -> LoRA ->
:func:`apply_memory` (fuse LoRA -> fp8 casting -> offload / placement -> text-encoder release flag).
"""

from __future__ import annotations

import gc
import logging
import re

import torch

from ..errors import DSDError, InputError
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

    from ..errors import ModelNotFoundError

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
def load_transformer(cfg: MemoryConfig, transformer_dir: str | None, dtype: torch.dtype, device=None,
                     init_condition_embedder: bool = False, config=None):
    """The DSD transformer in the storage format of ``cfg`` (fp8 casting happens later, after the LoRA).

    ``transformer_dir`` is the diffusers ``transformer/`` folder; for GGUF it (or ``config``) only provides the config
    and may be ``None`` (the config is then derived from the GGUF tensors).
    """
    from ..transformer import DSDTransformer2DModel

    if init_condition_embedder and cfg.transformer_weights not in ("native", "fp8"):
        raise DSDError("init_condition_embedder (training from plain FLUX) works with native or fp8 weights only.")
    if cfg.transformer_weights == "gguf":
        from .gguf import load_gguf_transformer

        model = load_gguf_transformer(cfg.gguf_file, dtype=dtype, config=config or transformer_dir)
    else:
        qc = quantization_config(cfg, dtype, device, transformer_dir)
        extra = {"quantization_config": qc} if qc is not None else {}
        model = DSDTransformer2DModel.from_pretrained(transformer_dir, dtype=dtype,
                                                      init_condition_embedder=init_condition_embedder, **extra)
    return model  # a quantizer may have replaced x_embedder: DSDTransformer2DModel re-attaches its hook itself


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
    """Apply ``cfg`` to a loaded pipeline (LoRA already loaded) and place it on ``device``.

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
    place(pipe, cfg, device, allow_cpu_offload)
    pipe.release_text_encoders = cfg.release_text_encoders
    pipe.memory_config = cfg


def place(pipe, cfg: MemoryConfig, device, allow_cpu_offload: bool = False) -> None:
    """Move the pipeline to ``device`` or install the offload of ``cfg``."""
    offload = cfg.offload
    if offload == "none":
        pipe.to(device)
        return
    if str(device).startswith("cpu") and not allow_cpu_offload:
        logger.warning("offload=%r has no effect on the CPU; running without offload.", offload)
        return
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        group_offload(pipe, device, cfg.group_offload_blocks, cfg.group_offload_streams)


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


# ---------------------------------------------------------------------------------------------- text encoders
def release_text_encoders(pipe) -> None:
    """Drop the text encoders (device and host memory). Encoded prompts stay cached on the pipeline."""
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    if getattr(pipe, "_all_hooks", None):  # model offload: rebuild the hook chain, whose hooks hold the encoders
        pipe.enable_model_cpu_offload(device=pipe._offload_device)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("released the text encoders; new prompts need the pipeline loaded again")


def released_error(prompt: str) -> InputError:
    return InputError(f"the text encoders were released after the first prompt (release_text_encoders), so the new "
                      f"prompt {prompt[:40]!r} cannot be encoded; load the pipeline again, or keep the encoders.")


# ---------------------------------------------------------------------------------------------- files
def resolve_gguf_parts(model, transformer, lora, token=None, local_files_only: bool = False):
    """(transformer config folder or None, LoRA file or None) for a GGUF transformer.

    Like :func:`dsd_core.loading.resolve_model`, but the 24 GB ``transformer/`` folder is never required or
    downloaded: a local ``transformer/`` (or ``transformer=``) only supplies ``config.json`` when present, and from a
    repo id only the LoRA file and ``transformer/config.json`` are fetched.
    """
    import os

    from ..loading import LORA_FILENAME, TRANSFORMER_DIR, _looks_like_repo_id, download, resolve_lora

    folder = None
    if model is not None and (lora is None or lora is True or transformer is None):
        model = os.path.expanduser(os.fspath(model))
        folder = download(model, [LORA_FILENAME, f"{TRANSFORMER_DIR}/config.json"], "the DSD LoRA", token,
                          local_files_only) if _looks_like_repo_id(model) else model
    config_dir = transformer
    if config_dir is None and folder is not None and os.path.isdir(os.path.join(folder, TRANSFORMER_DIR)):
        config_dir = os.path.join(folder, TRANSFORMER_DIR)
    if config_dir is not None and not os.path.isfile(os.path.join(os.fspath(config_dir), "config.json")):
        config_dir = None
    return config_dir, resolve_lora(lora, folder)
