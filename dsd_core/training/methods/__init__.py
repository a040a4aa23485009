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


#: method name -> "module:OptionsClass": the options alone, importable without torch (the CLI builds its parser
#: from them); the method class's ``Options`` is the same class.
OPTIONS = {
    "dsd-lora": "options:DSDLoRAOptions",
    "distill": "..distill.options:DistillOptions",
}


def _load(registry: dict, name: str):
    from ...errors import InputError

    if name not in registry:
        raise InputError(f"unknown training method {name!r}; choose from {', '.join(registry)}.")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def get_options(name: str) -> type:
    """The options dataclass of method ``name`` (without importing the method)."""
    return _load(OPTIONS, name)


def get_method(name: str) -> type[TrainingMethod]:
    return _load(METHODS, name)


__all__ = ["METHODS", "OPTIONS", "NoOptions", "TrainingMethod", "get_method", "get_options"]
