"""A disk cache of what the frozen models compute from the data: VAE latents and text embeddings.

Encoding is done once per (item content, model) and reused by every later step, epoch and run: the key of an entry
is the item's content hash (image bytes + caption, :meth:`PairRecord.content_key`) inside a folder named by the
fingerprint of the models that computed it (:func:`model_fingerprint`). Changing an image, a caption, the VAE or
the text encoders therefore never reuses a stale entry, and two runs on the same data share the cache.

Entries are safetensors files written atomically, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from .io import atomic_save_file

logger = logging.getLogger(__name__)


def model_fingerprint(*parts) -> str:
    """A short hash of models (config + every parameter's name, shape, dtype and a sample of its values) and of
    any plain values (sizes, options) that change what is cached."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.nn.Module):
            h.update(type(part).__name__.encode())
            config = getattr(part, "config", None)
            if config is not None:
                cfg = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
                h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, p in part.state_dict().items():
                h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
                h.update(sample.numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class TensorCache:
    """``folder/<fingerprint>/<key>.safetensors`` entries of named tensors."""

    def __init__(self, folder: str, fingerprint: str):
        self.folder = os.path.join(os.path.expanduser(folder), fingerprint)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], f"{key}.safetensors")

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        from safetensors.torch import load_file

        try:
            out = load_file(path)
        except Exception as e:  # a damaged entry is recomputed, never trusted
            logger.warning("cache entry %s is unreadable (%s); computing it again", path, e)
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_file(tensors, self.path(key))

    def get_or_compute(self, key: str, compute) -> dict[str, torch.Tensor]:
        found = self.get(key)
        if found is not None:
            return found
        self.misses += 1
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        self.put(key, tensors)
        return tensors


def text_key(prompt: str, max_sequence_length: int) -> str:
    return hashlib.sha256(f"text\0{max_sequence_length}\0{prompt}".encode("utf-8")).hexdigest()
