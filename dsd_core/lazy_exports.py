"""Lazy package exports: a package's public names are imported from their submodules on first use, so importing the
package (and the CLI's ``--help``) stays light."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __all__)`` for ``package``; ``exports`` maps each public name to its submodule (relative)."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)
