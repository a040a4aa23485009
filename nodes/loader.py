"""DSD Model Loader and DSD Unload Model: pick (or download) a DSD model and a FLUX.1-dev base, keep it loaded.

The loader returns a ``DSD_MODEL`` handle (:class:`dsd_core.model_store.LazyPipeline`). ComfyUI caches node outputs,
so the model stays loaded between queue runs while the loader's inputs are unchanged; picking another model
replaces the handle, and ComfyUI's "free memory" (which clears its output cache) drops it.
"""

from __future__ import annotations

import os

from . import _comfy


def _config_inputs() -> dict:
    """The dtype / memory / speed widgets of both loaders: choices and tooltips from dsd_core's option lists and the
    configs' own descriptions (the same text as the CLI's help)."""
    from dsd_core.memory.config import PRESETS
    from dsd_core.options import DTYPE_CHOICES, DTYPE_HELP
    from dsd_core.speed import SPEED_MODES

    presets = "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
    modes = "; ".join(f"{k}: {v}" for k, v in SPEED_MODES.items())
    return {
        "dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": DTYPE_HELP + "; fp8 files are upcast to it."}),
        "memory": (list(PRESETS), {"default": "full", "tooltip": "Memory preset by GPU size (estimated peak VRAM in "
                                                                 "the README). " + presets}),
        "speed": (list(SPEED_MODES), {"default": "exact", "tooltip": modes}),
    }


def _typed(dtype: str, memory: str, speed: str) -> dict:
    """Widget strings -> dtype, MemoryConfig and SpeedConfig, at once (one-line errors naming the choices)."""
    from dsd_core.memory.config import MemoryConfig
    from dsd_core.options import parse_dtype
    from dsd_core.speed import SpeedConfig

    return dict(dtype=parse_dtype(dtype), memory=MemoryConfig.from_name(memory), speed=SpeedConfig.from_name(speed))


def _load(source, settings: dict):
    """A loaded DSD_MODEL handle for ``source`` (loaded now, so errors and load time show on the loader node)."""
    from dsd_core.model_store import LazyPipeline, PipelineSpec

    spec = PipelineSpec(source=source, device=_comfy.torch_device(), **settings)
    handle = LazyPipeline(spec)
    _comfy.make_room(spec.device)
    handle.get()
    return (handle,)


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
            **_config_inputs(),
            "download_missing": ("BOOLEAN", {"default": False,
                                             "tooltip": "Download missing models from Hugging Face (~24 GB DSD + ~10 GB "
                                                        "FLUX.1-dev parts) into models/dsd and models/diffusers."}),
        }}

    @_comfy.user_errors
    def load(self, model, base, dtype, memory, speed, download_missing):
        from dsd_core.sources import FolderSource

        from dsd_core.errors import DSDError
        from dsd_core.sources import raise_all

        settings = _typed(dtype, memory, speed)  # bad settings fail before any download
        folders, problems = {}, []
        for key, name, folder, kind in (("model", model, _comfy.DSD_FOLDER, "dsd"),
                                        ("base", base, _comfy.BASE_FOLDER, "base")):
            try:
                folders[key] = _resolve(name, folder, download_missing, kind)
            except DSDError as e:  # report both folders at once
                problems.append(e)
        raise_all(problems)
        return _load(FolderSource(**folders, local_files_only=True), settings)


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
            **_config_inputs(),
        }}

    @_comfy.user_errors
    def load(self, transformer, lora, clip_l, t5xxl, vae, dtype, memory, speed):
        from dsd_core.model_store import find_folder
        from dsd_core.sources import FilesSource

        settings = _typed(dtype, memory, speed)
        paths = {key: _file(name, self.FOLDERS[key], key) for key, name in
                 dict(transformer=transformer, lora=lora, clip_l=clip_l, t5xxl=t5xxl, vae=vae).items()}
        source = FilesSource(**paths, tokenizers=find_folder("tokenizers", _comfy.folder_roots(_comfy.DSD_FOLDER)))
        return _load(source, settings)


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
