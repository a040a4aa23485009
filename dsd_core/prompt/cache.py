"""Cache of successful prompt enhancements (in memory and on disk as JSON).

The key is a sha256 over: the sha256 of the reference image's RGB pixels (and
size), the user prompt, the backend, the model, and INSTRUCTIONS_VERSION. Only
successful enhancements are stored. Records hold the prompts and the caption,
never credentials.

Directory: ``$DSD_CACHE_DIR/prompt`` if DSD_CACHE_DIR is set, else
``~/.cache/dsd_core/prompt``. Files are written to a temporary file first and
then moved into place with ``os.replace``, so readers never see half a file.
Disk errors are logged at debug level and otherwise ignored: the cache is an
optimisation, never a reason to fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from ..files import atomic_open
from .base import INSTRUCTIONS_VERSION

logger = logging.getLogger(__name__)

_MEMORY_LIMIT = 256
_memory: "OrderedDict[str, dict]" = OrderedDict()
_memory_lock = threading.Lock()


def default_cache_dir() -> Path:
    """Return the prompt cache directory from DSD_CACHE_DIR or the user cache dir."""
    root = os.environ.get("DSD_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dsd_core"
    return base / "prompt"


def image_digest(image: Image.Image) -> str:
    """sha256 of the image's RGB pixels and size."""
    rgb = image.convert("RGB")
    h = hashlib.sha256()
    h.update(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def make_key(image_sha: str, prompt: str, backend: str, model: str) -> str:
    """Cache key for one enhancement request."""
    payload = json.dumps(
        [image_sha, prompt, backend, model, INSTRUCTIONS_VERSION], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def clear_memory_cache() -> None:
    """Forget the in-memory entries (the disk cache is kept)."""
    with _memory_lock:
        _memory.clear()


class PromptCache:
    """Two-level cache: a small in-memory LRU in front of one JSON file per key."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """Return the stored record for ``key`` or None."""
        mkey = self._memory_key(key)
        with _memory_lock:
            record = _memory.get(mkey)
            if record is not None:
                _memory.move_to_end(mkey)
                return dict(record)
        try:
            with open(self._path(key), encoding="utf-8") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.debug("Ignoring unreadable prompt cache file %s (%s)", self._path(key), type(exc).__name__)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("enhanced"), str) or not record["enhanced"]:
            return None
        self._remember(key, record)
        return dict(record)

    def put(self, key: str, record: dict) -> None:
        """Store ``record`` (a JSON-serialisable dict) for ``key``."""
        self._remember(key, record)
        try:
            with atomic_open(str(self._path(key)), "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False, indent=1)
        except OSError as exc:
            logger.debug("Could not write prompt cache in %s (%s)", self.directory, type(exc).__name__)

    def _memory_key(self, key: str) -> str:
        return f"{self.directory}|{key}"

    def _remember(self, key: str, record: dict) -> None:
        mkey = self._memory_key(key)
        with _memory_lock:
            _memory[mkey] = dict(record)
            _memory.move_to_end(mkey)
            while len(_memory) > _MEMORY_LIMIT:
                _memory.popitem(last=False)
