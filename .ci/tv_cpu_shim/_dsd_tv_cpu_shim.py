"""Import hook: lets PyPI's CUDA-built torchvision/torchaudio import beside a CPU-only torch.

Installed into site-packages by ``.ci/setup_comfy_engine.sh`` together with
``dsd_tv_cpu_shim.pth`` (one line: ``import _dsd_tv_cpu_shim``).

Why: PyPI's Linux torchvision/torchaudio wheels are CUDA builds; their C++
extensions link ``libc10_cuda.so`` and cannot load next to ``torch 2.13.0+cpu``.

* torchvision tolerates a missing ``_C`` (``extension._has_ops()`` is False and
  ``torchvision.ops.nms`` & co. raise "Couldn't load custom C++ ops"), but
  ``torchvision._meta_registrations`` calls ``torch.library.register_fake`` on
  ``torchvision::nms``/``qnms``, which dies with
  ``RuntimeError: operator torchvision::nms does not exist``.  Just before that
  module runs, and only when torchvision itself reported that ``_C`` did not
  load, this hook declares those two op *schemas* (no kernels: calling them
  still fails loudly, exactly as torchvision intends without ``_C``).
* torchaudio's ``_extension.utils._load_lib`` re-raises the ``OSError`` of a
  library that exists but will not load.  The hook wraps it so that such an
  ``OSError`` returns False, which is torchaudio's own "no extension" mode
  (pure-Python functional/transforms keep working).

Nothing happens unless one of those modules is imported: the finder only
compares module names and steps aside for every other import.  When the
extensions do load (a matching CPU build), the hook changes nothing.
Set ``DSD_TV_CPU_SHIM=0`` to disable it.
"""

from __future__ import annotations

import os
import sys

_TV_META = "torchvision._meta_registrations"
_TA_UTILS = "torchaudio._extension.utils"
_TARGETS = frozenset((_TV_META, _TA_UTILS))

# keeps the torch.library.Library object alive (dropping it would undo the schemas)
_keepalive: list = []


def _declare_torchvision_schemas() -> None:
    ext = sys.modules.get("torchvision.extension")
    if ext is None or ext._has_ops():
        return  # _C loaded (or unknown state): do not touch anything
    import torch

    if torch._C._jit_get_schemas_for_operator("torchvision::nms"):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    # same schemas as torchvision/csrc/ops/nms.cpp and quantized/cpu/qnms_kernel.cpp
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keepalive.append(lib)


def _patch_torchaudio_load_lib(module) -> None:
    orig = getattr(module, "_load_lib", None)
    if orig is None or getattr(orig, "_dsd_tv_cpu_shim", False):
        return

    def _load_lib(lib: str) -> bool:
        try:
            return orig(lib)
        except OSError as exc:  # a CUDA build that cannot load beside CPU torch
            import logging

            logging.getLogger("torchaudio").debug("dsd_tv_cpu_shim: %s not loaded: %s", lib, exc)
            return False

    _load_lib._dsd_tv_cpu_shim = True  # type: ignore[attr-defined]
    module._load_lib = _load_lib


class _HookedLoader:
    def __init__(self, loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._fullname == _TV_META:
            _declare_torchvision_schemas()
        self._loader.exec_module(module)
        if self._fullname == _TA_UTILS:
            _patch_torchaudio_load_lib(module)

    def __getattr__(self, name):  # get_filename, get_source, is_package, ...
        return getattr(self._loader, name)


class _ShimFinder:
    """Meta-path finder that only reacts to the two module names above."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is cls or isinstance(finder, _ShimFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None

    # importlib.invalidate_caches() calls this on meta-path finders
    @classmethod
    def invalidate_caches(cls):
        return None


def install() -> None:
    if os.environ.get("DSD_TV_CPU_SHIM", "1") == "0":
        return
    if _ShimFinder in sys.meta_path:
        return
    sys.meta_path.insert(0, _ShimFinder)


install()
