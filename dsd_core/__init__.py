"""dsd_core: Diffusion Self-Distillation (DSD) generation on FLUX.1-dev, independent of ComfyUI.

Public API (imported lazily so that ``import dsd_core`` is cheap)::

    from dsd_core import DSDPipeline, DSDTransformer2DModel, load_pipeline, load_image, prepare_reference
    from dsd_core import FolderSource, FilesSource, MemoryConfig, SpeedConfig

``load_pipeline`` is the one way to build a pipeline (``DSDPipeline.from_dsd`` is the same call); see
:mod:`dsd_core.loading`.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "DSDPipeline": "pipeline",
    "DSDPipelineOutput": "pipeline",
    "clean_prompt": "pipeline",
    "DSDTransformer2DModel": "transformer",
    "load_pipeline": "loading",
    "load_flux_pipeline": "loading",
    "FolderSource": "sources",
    "FilesSource": "sources",
    "MemoryConfig": "memory.config",
    "SpeedConfig": "speed",
    "load_image": "image",
    "prepare_reference": "image",
    "pil_to_tensor": "image",
    "tensor_to_pil": "image",
    "TrueGuidance": "guidance",
    "DSDError": "errors",
    "ModelNotFoundError": "errors",
    "ModelFormatError": "errors",
    "InputError": "errors",
    "GenerationCancelled": "errors",
}

__getattr__, _names = lazy_exports(__name__, _EXPORTS)
__all__ = _names + ["__version__"]
