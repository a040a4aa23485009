"""Loading DSD: the one public way to get a pipeline.

::

    from dsd_core import load_pipeline
    from dsd_core.memory import MemoryConfig
    from dsd_core.sources import FilesSource

    pipe = load_pipeline()                                            # primecai/dsd_model + FLUX.1-dev (downloads)
    pipe = load_pipeline(base="models/FLUX.1-dev", model="models/dsd_model", memory=MemoryConfig.from_preset("12gb"))
    pipe = load_pipeline(source=FilesSource("dsd_transformer.safetensors", "clip_l.safetensors",
                                            "t5xxl_fp16.safetensors", "ae.safetensors", lora="dsd_lora.safetensors"))

The folder route and the files route differ only in their source (:mod:`dsd_core.sources`); both run the same
assembler (:func:`dsd_core.assembly.build_pipeline`). ``DSDPipeline.from_dsd(base, model, ...)`` is the same call.
"""

from __future__ import annotations

from .assembly import build_pipeline, default_device, resolve_dtype
from .errors import DSDError
from .sources import (BASE_COMPONENTS, BASE_PATTERNS, DEFAULT_BASE, DEFAULT_MODEL, LORA_FILENAME, MODEL_PATTERNS,
                      TRANSFORMER_DIR, FilesSource, FolderSource, download, resolve_base, resolve_lora, resolve_model)

__all__ = ["load_pipeline", "build_pipeline", "default_device", "resolve_dtype", "FolderSource", "FilesSource",
           "download", "resolve_base", "resolve_model", "resolve_lora", "DEFAULT_BASE", "DEFAULT_MODEL",
           "LORA_FILENAME", "TRANSFORMER_DIR", "BASE_COMPONENTS", "BASE_PATTERNS", "MODEL_PATTERNS"]


def load_pipeline(
    base: str | None = None,
    model: str | None = None,
    transformer: str | None = None,
    lora: str | bool | None = None,
    *,
    source=None,
    dtype=None,
    device: str | None = None,
    token: str | None = None,
    local_files_only: bool = False,
    init_condition_embedder: bool = False,
    memory=None,
    speed=None,
):
    """A ready :class:`~dsd_core.DSDPipeline`.

    Args:
        base: FLUX.1-dev diffusers folder or repo id (default ``black-forest-labs/FLUX.1-dev``; only the VAE, text
            encoders, tokenizers and scheduler are used).
        model: folder or repo id holding ``transformer/`` and ``pytorch_lora_weights.safetensors`` (default
            ``primecai/dsd_model``).
        transformer, lora: explicit overrides of the model folder's parts (``lora=False``: no LoRA; a file path).
        source: instead of the folder arguments, any model source, e.g. :class:`~dsd_core.sources.FilesSource`
            (ComfyUI's single files).
        dtype: ``"bfloat16"`` / ``"float16"`` / ``"float32"`` or a ``torch.dtype`` (default: bf16 on a GPU, fp32 on
            CPU).
        device: ``cuda`` / ``mps`` / ``cpu`` (default: the best available).
        token: Hugging Face token (default: the user's login / ``HF_TOKEN``).
        local_files_only: never download; missing files are an error that says what to fetch.
        init_condition_embedder: accept a plain FLUX transformer and start ``c_embedder`` at zero (training).
        memory: a :class:`dsd_core.memory.MemoryConfig` (``MemoryConfig.from_preset("12gb")``, or its switches:
            weight storage fp8/int8/int4/nf4/gguf, offload, LoRA fusing, text-encoder release); default: no savings.
        speed: a :class:`dsd_core.speed.SpeedConfig` (``SpeedConfig.fast()``, or its switches: torch.compile,
            attention backend, First Block Cache, true-guidance window); default: exact.
    """
    from .pipeline import DSDPipeline

    folder = dict(base=base, model=model, transformer=transformer, lora=lora, token=token,
                  local_files_only=local_files_only, init_condition_embedder=init_condition_embedder)
    if source is None:
        source = FolderSource.from_kwargs(**folder)
    elif any(v not in (None, False) for v in folder.values()):
        given = ", ".join(k for k, v in folder.items() if v not in (None, False))
        raise DSDError(f"load_pipeline got source= and {given}; put those settings in the source instead.")
    return build_pipeline(source, memory, speed, device, dtype, pipeline_class=DSDPipeline)
