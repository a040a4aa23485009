"""DSD Model Loader and DSD Unload Model: pick (or download) a DSD model and a FLUX.1-dev base, keep it loaded.

The loader returns a ``DSD_MODEL`` handle (:class:`dsd_core.model_store.LazyPipeline`). ComfyUI caches node outputs,
so the model stays loaded between queue runs while the loader's inputs are unchanged; picking another model
replaces the handle, and ComfyUI's "free memory" (which clears its output cache) drops it.
"""

from __future__ import annotations

import os

from . import _comfy

DTYPES = ["auto", "bfloat16", "float16", "float32"]
OFFLOAD = ["none", "model", "sequential"]


def _choices(default: str, names: list[str]) -> list[str]:
    return [default] + [n for n in names if n != default]


class DSDModelLoader:
    DESCRIPTION = (
        "Loads Diffusion Self-Distillation: the DSD transformer + LoRA from models/dsd/<name>/ and the FLUX.1-dev "
        "VAE, text encoders and scheduler from models/diffusers/<name>/. With download_missing on, missing folders "
        "are downloaded from primecai/dsd_model and black-forest-labs/FLUX.1-dev (gated: log in with `hf auth login` "
        "or set HF_TOKEN before starting ComfyUI). The model stays loaded between runs."
    )
    CATEGORY = "DSD/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("DSD_MODEL",)
    RETURN_NAMES = ("dsd_model",)

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME, list_base_models, list_dsd_models

        return {"required": {
            "model": (_choices(DEFAULT_MODEL_NAME, list_dsd_models(_comfy.folder_roots(_comfy.DSD_FOLDER))),
                      {"default": DEFAULT_MODEL_NAME,
                       "tooltip": "Folder under models/dsd holding transformer/ and pytorch_lora_weights.safetensors "
                                  "(primecai/dsd_model)."}),
            "base": (_choices(DEFAULT_BASE_NAME, list_base_models(_comfy.folder_roots(_comfy.BASE_FOLDER))),
                     {"default": DEFAULT_BASE_NAME,
                      "tooltip": "FLUX.1-dev diffusers folder under models/diffusers (only its VAE, text encoders, "
                                 "tokenizers and scheduler are used)."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bfloat16 on a GPU (as the reference), float32 on CPU."}),
            "offload": (OFFLOAD, {"default": "none",
                                  "tooltip": "none: everything on the GPU (~33 GB); model: one part at a time (~24 GB); "
                                             "sequential: layer by layer (<2 GB, very slow)."}),
            "download_missing": ("BOOLEAN", {"default": False,
                                             "tooltip": "Download missing models from Hugging Face (~24 GB DSD + ~10 GB "
                                                        "FLUX.1-dev parts) into models/dsd and models/diffusers."}),
        }}

    def load(self, model, base, dtype, offload, download_missing):
        from dsd_core.model_store import LazyPipeline, PipelineSpec

        model_dir = _resolve(model, _comfy.DSD_FOLDER, download_missing, "dsd")
        base_dir = _resolve(base, _comfy.BASE_FOLDER, download_missing, "base")
        spec = PipelineSpec(base=base_dir, model=model_dir, dtype=None if dtype == "auto" else dtype,
                            device=_comfy.torch_device(), offload=offload)
        handle = LazyPipeline(spec)
        handle.get()  # load now, so errors and load time show on this node
        return (handle,)


def _resolve(name: str, folder: str, download_missing: bool, kind: str) -> str:
    from dsd_core.errors import ModelNotFoundError
    from dsd_core.model_store import (DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME, download_base, download_dsd_model,
                                      find_folder)

    roots = _comfy.folder_roots(folder)
    path = find_folder(name, roots)
    if path is not None:
        return path
    default = DEFAULT_MODEL_NAME if kind == "dsd" else DEFAULT_BASE_NAME
    where = os.path.join(roots[0] if roots else f"models/{folder}", name)
    what = ("the transformer/ folder and pytorch_lora_weights.safetensors of primecai/dsd_model" if kind == "dsd"
            else "a diffusers FLUX.1-dev folder (model_index.json, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
                 "tokenizer_2/, scheduler/)")
    if not download_missing or name != default or not roots:
        hint = " or turn on download_missing" if name == default else ""
        raise ModelNotFoundError(f"{where} not found: put {what} there{hint}.")
    tqdm_class = _comfy.comfy_tqdm_class()
    if kind == "dsd":
        return download_dsd_model(where, tqdm_class=tqdm_class)
    return download_base(where, tqdm_class=tqdm_class)


class DSDUnloadModel:
    DESCRIPTION = "Frees the memory of a loaded DSD model now. It is loaded again when a DSD node next needs it."
    CATEGORY = "DSD/loaders"
    FUNCTION = "unload"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dsd_model": ("DSD_MODEL",)}, "optional": {"after": ("IMAGE",)}}

    def unload(self, dsd_model, after=None):
        dsd_model.release()
        return {}


NODE_CLASS_MAPPINGS = {"DSDModelLoader": DSDModelLoader, "DSDUnloadModel": DSDUnloadModel}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDModelLoader": "DSD Model Loader", "DSDUnloadModel": "DSD Unload Model"}
