"""Memory modes of the DSD pipeline: presets by card size, individual switches, and a memory model.

* :mod:`.config` -- :class:`MemoryConfig` (the switches) and :data:`PRESETS` (``full``, ``24gb``, ``16gb``, ``12gb``,
  ``8gb``, ``lowest``); ``MemoryConfig.from_preset(name, **switches)``.
* :mod:`.apply` -- loading the transformer in its storage format and applying a config to a pipeline (used by
  :func:`dsd_core.assembly.build_pipeline`, i.e. ``load_pipeline(memory=...)``).
* :mod:`.gguf` -- loading and writing GGUF quants of the DSD transformer.
* :mod:`.estimator` -- the memory model: resident weights per component and format, activations, and the estimated
  peak VRAM of each preset for full-size DSD (built on the meta device; no weights needed).

Usage::

    from dsd_core import load_pipeline
    from dsd_core.memory import MemoryConfig, estimate, preset_table
    pipe = load_pipeline(memory=MemoryConfig.from_preset("12gb"))      # or MemoryConfig(transformer_weights=...)
    print(estimate(MemoryConfig.from_preset("12gb")).peak_gib); print(preset_table())
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MemoryConfig": "config",
    "PRESETS": "config",
    "TRANSFORMER_WEIGHTS": "config",
    "TEXT_ENCODER_WEIGHTS": "config",
    "OFFLOAD_MODES": "config",
    "check_memory": "config",
    "load_transformer": "apply",
    "apply_memory": "apply",
    "MemoryHook": "apply",
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
