"""Memory modes of the DSD pipeline: presets by card size, individual switches, and a memory model.

* :mod:`.config` -- :class:`MemoryConfig` (the switches) and :data:`PRESETS` (``full``, ``24gb``, ``16gb``, ``12gb``,
  ``8gb``, ``lowest``); :func:`resolve_memory` turns a name/dict/config into a :class:`MemoryConfig`.
* :mod:`.apply` -- loading the transformer in its storage format and applying a config to a pipeline (used by
  :func:`dsd_core.loading.load_pipeline`'s ``memory=`` argument).
* :mod:`.gguf` -- loading and writing GGUF quants of the DSD transformer.
* :mod:`.estimator` -- the memory model: resident weights per component and format, activations, and the estimated
  peak VRAM of each preset for full-size DSD (built on the meta device; no weights needed).

Usage::

    from dsd_core import load_pipeline
    pipe = load_pipeline(memory="12gb")                  # or MemoryConfig(...)
    from dsd_core.memory import estimate, preset_table
    print(estimate("12gb").peak_gib); print(preset_table())
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MemoryConfig": "config",
    "PRESETS": "config",
    "TRANSFORMER_WEIGHTS": "config",
    "TEXT_ENCODER_WEIGHTS": "config",
    "OFFLOAD_MODES": "config",
    "resolve_memory": "config",
    "load_transformer": "apply",
    "apply_memory": "apply",
    "release_text_encoders": "apply",
    "load_gguf_transformer": "gguf",
    "save_gguf": "gguf",
    "estimate": "estimator",
    "MemoryEstimate": "estimator",
    "component_sizes": "estimator",
    "component_table": "estimator",
    "preset_table": "estimator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dsd_core.memory' has no attribute {name!r}")
