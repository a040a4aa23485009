"""DSD Model Loader and DSD Unload Model: pick (or download) a DSD model and a FLUX.1-dev base, keep it loaded.

The loader returns a ``DSD_MODEL`` handle (:class:`dsd_core.model_store.LazyPipeline`). ComfyUI caches node outputs,
so the model stays loaded between queue runs while the loader's inputs are unchanged; picking another model
replaces the handle, and ComfyUI's "free memory" (which clears its output cache) drops it.
"""

from __future__ import annotations

import os

from . import _comfy

DTYPES = ["auto", "bfloat16", "float16", "float32"]
SPEED = ["exact", "fast"]


def _memory_input():
    from dsd_core.memory.config import PRESETS

    tips = "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
    return (list(PRESETS), {"default": "full", "tooltip": "Memory preset by GPU size (estimated peak VRAM in the "
                                                          "README). " + tips})


SPEED_INPUT = (SPEED, {"default": "exact", "tooltip": "exact: the reference's numerics; fast: First Block Cache "
                                                      "(skips work on steps that change little; slightly lossy)."})


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
            "memory": _memory_input(),
            "speed": SPEED_INPUT,
            "download_missing": ("BOOLEAN", {"default": False,
                                             "tooltip": "Download missing models from Hugging Face (~24 GB DSD + ~10 GB "
                                                        "FLUX.1-dev parts) into models/dsd and models/diffusers."}),
        }}

    @_comfy.user_errors
    def load(self, model, base, dtype, memory, speed, download_missing):
        from dsd_core.model_store import LazyPipeline, PipelineSpec

        model_dir = _resolve(model, _comfy.DSD_FOLDER, download_missing, "dsd")
        base_dir = _resolve(base, _comfy.BASE_FOLDER, download_missing, "base")
        spec = PipelineSpec(base=base_dir, model=model_dir, dtype=None if dtype == "auto" else dtype,
                            device=_comfy.torch_device(), memory=memory, speed=speed)
        handle = LazyPipeline(spec)
        _comfy.make_room(spec.device)
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


class DSDFilesLoader:
    DESCRIPTION = (
        "Loads DSD from the single files ComfyUI users already have, with nothing downloaded: the DSD transformer "
        "as one safetensors file in models/diffusion_models (diffusers or original FLUX key layout, bf16 or fp8; e.g. "
        "primecai/dsd_model's transformer/diffusion_pytorch_model.safetensors renamed dsd_transformer.safetensors), "
        "or a GGUF quant of it, the DSD LoRA in models/loras, clip_l and t5xxl (fp16 or fp8) in models/text_encoders "
        "and ae in models/vae. "
        "Tokenizers come from models/dsd/tokenizers/{clip,t5} if present, else from this ComfyUI's own copies."
    )
    CATEGORY = "DSD/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("DSD_MODEL",)
    RETURN_NAMES = ("dsd_model",)
    DEFAULTS = {"transformer": "dsd_transformer.safetensors", "lora": "dsd_lora.safetensors",
                "clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors", "vae": "ae.safetensors"}
    FOLDERS = {"transformer": "unet", "lora": "loras", "clip_l": "clip", "t5xxl": "clip", "vae": "vae"}

    @classmethod
    def INPUT_TYPES(cls):
        def files(key):
            names = _comfy.filenames(cls.FOLDERS[key])
            if key == "transformer":  # ComfyUI does not list .gguf files
                names = sorted(set(names) | set(_comfy.filenames_with_extension(cls.FOLDERS[key], ".gguf")))
            return (_choices(cls.DEFAULTS[key], names), {"default": cls.DEFAULTS[key]})

        return {"required": {
            "transformer": files("transformer"), "lora": files("lora"), "clip_l": files("clip_l"),
            "t5xxl": files("t5xxl"), "vae": files("vae"),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bfloat16 on a GPU, float32 on CPU; fp8 files are "
                                                             "upcast to it."}),
            "memory": _memory_input(),
            "speed": SPEED_INPUT,
        }}

    @_comfy.user_errors
    def load(self, transformer, lora, clip_l, t5xxl, vae, dtype, memory, speed):
        from dsd_core.model_store import FilesPipelineSpec, LazyPipeline, find_folder

        paths = {key: _file(name, self.FOLDERS[key], key) for key, name in
                 dict(transformer=transformer, lora=lora, clip_l=clip_l, t5xxl=t5xxl, vae=vae).items()}
        spec = FilesPipelineSpec(**paths, tokenizers=find_folder("tokenizers", _comfy.folder_roots(_comfy.DSD_FOLDER)),
                                 dtype=None if dtype == "auto" else dtype, device=_comfy.torch_device(),
                                 memory=memory, speed=speed)
        handle = LazyPipeline(spec)
        _comfy.make_room(spec.device)
        handle.get()
        return (handle,)


def _file(name: str, folder: str, what: str) -> str:
    from dsd_core.errors import ModelNotFoundError

    path = _comfy.full_path(folder, name)
    if path is None:
        raise ModelNotFoundError(f"{what} file {name} not found in ComfyUI's {folder} folders "
                                 f"({', '.join(_comfy.folder_roots(folder)) or 'none registered'}); put it there "
                                 "or pick another file.")
    return path


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


NODE_CLASS_MAPPINGS = {"DSDModelLoader": DSDModelLoader, "DSDFilesLoader": DSDFilesLoader,
                       "DSDUnloadModel": DSDUnloadModel}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDModelLoader": "DSD Model Loader", "DSDFilesLoader": "DSD Model Loader (ComfyUI files)",
                              "DSDUnloadModel": "DSD Unload Model"}
