"""ComfyUI nodes of ComfyUI-SelfDistill: thin V1 adapters over ``dsd_core`` (no algorithms here).

Each node module is imported on its own: if one cannot be imported (a missing optional dependency), the others still
register, and a placeholder node with the same name explains what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from . import _comfy

logger = logging.getLogger(__name__)

_CORE = ("diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub")
# module -> (node names, packages it needs); google-genai stays optional (the enhancer falls back without it)
_MODULES = {
    "loader": (("DSDModelLoader", "DSDFilesLoader", "DSDUnloadModel"), _CORE),
    "image_prep": (("DSDImagePrep",), ()),
    "sampler": (("DSDSampler",), _CORE),
    "prompt_enhancer": (("DSDPromptEnhancer",), ()),
    "distill": (("DSDTeacherPairs", "DSDBuildStudent", "DSDDistillStudent", "DSDCompareStudent"), _CORE),
    "training": (("DSDTrainingDataset", "DSDTrainLoRA", "DSDSaveTrainedModel", "DSDPlotLoss"), _CORE),
}

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


def _unavailable(name: str, error: Exception):
    message = (f"{name} cannot run: {error}. Install the pack's requirements into ComfyUI's Python "
               "(pip install -r custom_nodes/ComfyUI-SelfDistill/requirements.txt) and restart ComfyUI.")

    class Unavailable:
        DESCRIPTION = message
        CATEGORY = "DSD/unavailable"
        FUNCTION = "run"
        RETURN_TYPES = ()
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            raise RuntimeError(message)

    Unavailable.__name__ = name
    return Unavailable


def _missing(packages) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


for _module, (_names, _needs) in _MODULES.items():
    try:
        _absent = _missing(_needs)
        if _absent:
            raise ImportError(f"missing Python packages: {', '.join(_absent)}")
        _mod = importlib.import_module(f".{_module}", __name__)
        NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
    except ImportError as e:  # keep ComfyUI and the other nodes working
        logger.warning("ComfyUI-SelfDistill: %s nodes unavailable (%s)", _module, e)
        for _name in _names:
            NODE_CLASS_MAPPINGS[_name] = _unavailable(_name, e)
            NODE_DISPLAY_NAME_MAPPINGS[_name] = f"{_name} (unavailable)"

_comfy.register_model_folders()
