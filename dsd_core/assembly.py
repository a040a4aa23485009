"""The one assembler: a model source + memory + speed settings -> a ready pipeline, always in the same order.

::

    memory  = source.memory(memory)        # what the source can load with (e.g. a .gguf file = GGUF weights)
    check the packages / device the memory config needs (before any download)
    parts   = source.resolve(memory)       # local files; downloads; every problem at once
    components = parts.load_components(dtype)                 # VAE, text encoders, tokenizers, scheduler
    transformer = memory.apply.load_transformer(memory, parts)  # native / int8 / int4 / nf4 / GGUF
    pipe = pipeline_class(transformer=transformer, **components)
    pipe.load_dsd_lora(parts.lora)         # unfused PEFT adapter, like the reference
    apply_memory(pipe, memory, device)     # fuse LoRA -> fp8 -> offload / placement -> per-call "memory" hook
    apply_speed(pipe, speed)               # attention backend -> step cache -> compile -> per-call "speed" hook

Use it through :func:`dsd_core.loading.load_pipeline` (or ``DSDPipeline.from_dsd``). This module never imports the
pipeline module: the class to build is an argument, so the pipeline can offer ``from_dsd`` without an import cycle.
"""

from __future__ import annotations

import logging

from .options import default_device  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


def resolve_dtype(dtype, device: str):
    """A ``torch.dtype`` (name or dtype; :func:`dsd_core.options.parse_dtype`), or for ``None``/``"auto"``:
    bfloat16 on accelerators (the reference), float32 on CPU (bf16 on CPU is slow)."""
    import torch

    from .options import parse_dtype

    dtype = parse_dtype(dtype)
    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    return dtype


def build_pipeline(source, memory=None, speed=None, device: str | None = None, dtype=None, *, pipeline_class):
    """Assemble ``pipeline_class`` from ``source`` (:class:`~dsd_core.sources.FolderSource` or
    :class:`~dsd_core.sources.FilesSource`) with ``memory`` (a :class:`~dsd_core.memory.MemoryConfig` or None: no
    savings) and ``speed`` (a :class:`~dsd_core.speed.SpeedConfig` or None: exact), on ``device`` (default: the
    best available) in ``dtype`` (default: bf16 on a GPU, fp32 on CPU). See the module docstring for the order."""
    from .memory.apply import apply_memory, check_available, load_transformer
    from .memory.config import check_memory
    from .speed import apply_speed, check_speed

    from .validation import check_device

    memory, speed = check_memory(memory), check_speed(speed)
    check_device(device)  # a missing CUDA/MPS is one line, before anything is read
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    memory = source.memory(memory)
    check_available(memory, device)  # before any download
    parts = source.resolve(memory)
    logger.info("loading DSD from %s (%s, %s, %s)", source, memory.describe(), device, torch_dtype)

    components = parts.load_components(torch_dtype)
    transformer = load_transformer(memory, parts, torch_dtype, device)
    parts.check(transformer, components)
    pipe = pipeline_class(transformer=transformer, **components)
    if parts.lora is not None:
        pipe.load_dsd_lora(parts.lora)
    apply_memory(pipe, memory, device)
    apply_speed(pipe, speed)
    return pipe

