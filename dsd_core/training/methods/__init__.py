"""Training methods: what is trained and how (the engine in :mod:`dsd_core.training.engine` runs any of them).

``METHODS`` maps ``--method`` names to classes, imported lazily.
"""

from __future__ import annotations

import importlib

from .base import NoOptions, TrainingMethod

#: method name -> "module:Class" (relative to this package)
METHODS = {
    "dsd-lora": "dsd_lora:DSDLoRAMethod",
    "distill": "..distill.method:DistillationMethod",  # dsd_core/distill/method.py
}


def get_method(name: str) -> type[TrainingMethod]:
    from ...errors import InputError

    if name not in METHODS:
        raise InputError(f"unknown training method {name!r}; choose from {', '.join(METHODS)}.")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


__all__ = ["METHODS", "NoOptions", "TrainingMethod", "get_method"]
