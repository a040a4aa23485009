"""ComfyUI-SelfDistill: ComfyUI entry point.

ComfyUI imports this folder as a package. The nodes are thin adapters over ``dsd_core``, which is loaded from this
folder under its own name (without touching ``sys.path``, so ComfyUI's own ``nodes`` module is never shadowed).
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_core() -> None:
    if "dsd_core" in sys.modules:
        return
    core = os.path.join(_HERE, "dsd_core")
    spec = importlib.util.spec_from_file_location("dsd_core", os.path.join(core, "__init__.py"),
                                                  submodule_search_locations=[core])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dsd_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["dsd_core"]
        raise


_load_core()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
