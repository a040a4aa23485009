"""Files of a training run: atomic writes, and nested states (optimiser, scheduler, RNG) as safetensors.

Optimiser and scheduler states are nested dicts/lists of tensors and plain values. torch would pickle them; we never
load pickles, so :func:`save_tree` writes the tensors to a safetensors file and the structure (with every non-tensor
value) as JSON in its header, and :func:`load_tree` rebuilds the object exactly.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` atomically with the user's umask (:func:`dsd_core.files.write_text`)."""
    from ..files import write_text

    write_text(path, text)


def atomic_save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` atomically with the user's umask (:func:`dsd_core.files.save_safetensors`)."""
    from ..files import save_safetensors

    save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)


def _flatten(obj, tensors: dict, prefix: str):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot store a dict with key types {sorted({type(k).__name__ for k in obj})}")
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_tree(obj, path: str) -> None:
    """Write a nested structure of tensors and plain values as one safetensors file (atomically)."""
    tensors: dict = {}
    structure = _flatten(obj, tensors, "state")
    atomic_save_file(tensors, path, metadata={"tree": json.dumps(structure)})


def load_tree(path: str):
    """Read what :func:`save_tree` wrote (no pickle involved)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        structure = json.loads(f.metadata()["tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(structure, tensors)


def replace_dir(tmp: str, final: str) -> None:
    """Move a completed folder into place (an existing ``final`` is replaced)."""
    if os.path.isdir(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
