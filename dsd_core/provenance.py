"""What a saved image says about the models that made it: names and content fingerprints, not local paths.

A PNG's settings travel with the image when it is shared, so absolute paths (``/home/alice/models/...``) would leak
the user's name and folder layout. :func:`model_record` records a repo id as given, and a local file or folder as its
name plus a fingerprint: the SHA-256 of the safetensors *headers* under it (tensor names, shapes, dtypes and byte
offsets; cheap to compute even for 24 GB of weights, and different for any re-trained or re-quantised file). Full
paths are recorded only when asked (``--record-paths``).
"""

from __future__ import annotations

import hashlib
import os
import struct

#: Most safetensors files a fingerprint reads (a FLUX base folder has about ten).
MAX_FILES = 64


def _header(path: str) -> bytes:
    with open(path, "rb") as f:
        size = f.read(8)
        if len(size) < 8:
            return size
        (n,) = struct.unpack("<Q", size)
        return size + f.read(min(n, 100_000_000))


def fingerprint(path: str | os.PathLike) -> str | None:
    """16 hex digits of the SHA-256 over the safetensors headers of ``path`` (a file, or the files under a folder,
    with their relative names); None if there are none or they cannot be read."""
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)] if path.endswith((".safetensors", ".sft")) else []
    else:
        files = []
        for folder, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [(os.path.relpath(os.path.join(folder, n), path), os.path.join(folder, n)) for n in sorted(names)
                      if n.endswith((".safetensors", ".sft"))]
            if len(files) >= MAX_FILES:
                break
    if not files:
        return None
    digest = hashlib.sha256()
    try:
        for rel, full in sorted(files)[:MAX_FILES]:
            digest.update(rel.replace(os.sep, "/").encode() + b"\0" + _header(full))
    except OSError:
        return None
    return digest.hexdigest()[:16]


def model_record(value, full_paths: bool = False):
    """How a model argument is recorded in image metadata: a repo id as given; a local path as
    ``"name (sha256:...)"`` (its absolute path when ``full_paths``); None/False as None."""
    if value is None or value is False:
        return None
    text = os.fspath(value)
    path = os.path.expanduser(text)
    if not os.path.exists(path):
        return text  # a hub repo id (or whatever the user typed): nothing local in it
    if full_paths:
        return os.path.abspath(path)
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    digest = fingerprint(path)
    return f"{name} (sha256:{digest})" if digest else name
