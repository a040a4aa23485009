"""Model folders on disk: find DSD and FLUX base folders, download into them, and load a pipeline lazily.

This is what an application (the ComfyUI nodes, a server) needs around :func:`dsd_core.loading.load_pipeline`:

* :func:`list_dsd_models` / :func:`list_base_models` list the usable folders under some roots
  (e.g. ``ComfyUI/models/dsd`` and ``ComfyUI/models/diffusers``);
* :func:`download_dsd_model` / :func:`download_base` fetch ``primecai/dsd_model`` or the FLUX.1-dev base components
  into such a folder (only when asked; with huggingface_hub's progress and the user's token);
* :class:`PipelineSpec` is what to load, already typed (a source, a MemoryConfig, a SpeedConfig, a dtype);
  :class:`LazyPipeline` holds one and loads it on first use; :meth:`LazyPipeline.release` frees it.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import ModelNotFoundError
from .sources import (BASE_PATTERNS, BASE_WHAT, DEFAULT_BASE, DEFAULT_MODEL, LORA_FILENAME, MODEL_PATTERNS, MODEL_WHAT,
                      TRANSFORMER_DIR, download)

logger = logging.getLogger(__name__)

#: Folder names the official downloads get (``models/dsd/dsd_model``, ``models/diffusers/FLUX.1-dev``).
DEFAULT_MODEL_NAME = "dsd_model"
DEFAULT_BASE_NAME = "FLUX.1-dev"


def is_dsd_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRANSFORMER_DIR, "config.json"))


def is_base_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) and os.path.isdir(os.path.join(path, "vae"))


def _list(roots: Iterable[str], accept: Callable[[str], bool]) -> list[str]:
    names: set[str] = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if not name.startswith(".") and accept(os.path.join(root, name)):
                names.add(name)
    return sorted(names, key=str.lower)


def list_dsd_models(roots: Iterable[str]) -> list[str]:
    """Names of folders under ``roots`` holding a DSD model (``transformer/config.json``)."""
    return _list(roots, is_dsd_model_folder)


def list_base_models(roots: Iterable[str]) -> list[str]:
    """Names of diffusers pipeline folders under ``roots`` (``model_index.json`` + ``vae/``)."""
    return _list(roots, is_base_folder)


def find_folder(name: str, roots: Iterable[str]) -> str | None:
    """The first ``root/name`` that exists, or None; a ``name`` that would leave the roots (``..``, absolute) is an
    :class:`~dsd_core.errors.InputError`."""
    from .validation import check_model_name

    name = check_model_name(name)
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def download_dsd_model(folder: str, repo_id: str = DEFAULT_MODEL, token: str | None = None,
                       tqdm_class=None) -> str:
    """Download ``transformer/`` and the LoRA of ``repo_id`` into ``folder`` (resumable; files land complete)."""
    os.makedirs(folder, exist_ok=True)
    download(repo_id, MODEL_PATTERNS, MODEL_WHAT, token, local_dir=folder, tqdm_class=tqdm_class)
    if not (is_dsd_model_folder(folder) and os.path.isfile(os.path.join(folder, LORA_FILENAME))):
        raise ModelNotFoundError(f"the download of {repo_id} into {folder} is incomplete; run it again.")
    return folder


def download_base(folder: str, repo_id: str = DEFAULT_BASE, token: str | None = None, tqdm_class=None) -> str:
    """Download the FLUX.1-dev components DSD uses (no transformer) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    download(repo_id, BASE_PATTERNS, BASE_WHAT, token, local_dir=folder, tqdm_class=tqdm_class)
    return folder


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides which pipeline is loaded, already typed; equal specs mean the same pipeline.

    source: a :class:`~dsd_core.sources.FolderSource` or :class:`~dsd_core.sources.FilesSource`.
    memory, speed: a :class:`~dsd_core.memory.MemoryConfig` and a :class:`~dsd_core.speed.SpeedConfig`.
    dtype: a ``torch.dtype`` or None (bf16 on a GPU, fp32 on CPU); device: e.g. ``"cuda"`` or None (best).
    """

    source: object
    memory: object = None
    speed: object = None
    dtype: object = None
    device: str | None = None


class LazyPipeline:
    """A pipeline loaded on first :meth:`get` and freed by :meth:`release` (it reloads on the next ``get``).

    Holding the spec instead of the weights lets an application keep one handle per loaded model, release the
    memory when asked, and reload transparently.
    """

    def __init__(self, spec: PipelineSpec, loader: Callable[[PipelineSpec], object] | None = None):
        self.spec = spec
        self._loader = loader or _load_spec
        self._pipe = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def get(self):
        with self._lock:
            if self._pipe is None:
                logger.info("loading %s", self.spec)
                self._pipe = self._loader(self.spec)
                # logged when the pipeline is really freed (release(), or the handle dropped by an application cache)
                weakref.finalize(self._pipe, logger.info, "released the DSD model (%s)", self.spec)
            return self._pipe

    def release(self) -> None:
        """Drop the pipeline and return its memory (CUDA cache included)."""
        with self._lock:
            if self._pipe is None:
                return
            pipe, self._pipe = self._pipe, None
            try:
                pipe.remove_all_hooks()
            except Exception:  # offload hooks may be absent
                pass
            del pipe
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def __repr__(self) -> str:
        return f"LazyPipeline({self.spec}, loaded={self.loaded})"


def _load_spec(spec: PipelineSpec):
    from .loading import load_pipeline

    return load_pipeline(source=spec.source, memory=spec.memory, speed=spec.speed, dtype=spec.dtype,
                         device=spec.device)
