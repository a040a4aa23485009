"""Model files and environment for the engine tier, prepared before each server starts.

``populate_models(models_dir)`` is called once per engine server (session scope) with an empty temp models folder
that already has the subfolders in ``MODEL_SUBDIRS``; every subfolder that exists when it returns is registered with
ComfyUI under its own name (``diffusion_models`` also as ``unet``, ``text_encoders`` also as ``clip``). It writes the
tiny DSD model set under the standard names the shipped workflows use: ``dsd/dsd_model`` and
``diffusers/FLUX.1-dev``, and again as single files (``diffusion_models/dsd_transformer.safetensors``,
``loras/dsd_lora.safetensors``, ``text_encoders/clip_l.safetensors`` + ``t5xxl_fp16.safetensors``, ``vae/ae.safetensors``,
tiny tokenizers in ``dsd/tokenizers``), and the head-128 set of ``dsd_core.tiny.write_tiny_native_files`` that
ComfyUI's own ``UNETLoader`` reads (``diffusion_models/dsd_transformer_h128.safetensors`` ...). Runs in the pytest process: keep ComfyUI imports out of it.

``server_environment(root)`` returns extra environment variables for the server process: a Gemini API key that
must never leak, pointed at a fake Gemini server on 127.0.0.1 (``FAKE_GEMINI``) started for the session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from pathlib import Path

MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "dsd", "diffusers", "dsd_concepts",
                 "embeddings")

# extra ComfyUI folder names that point at the same subfolder
FOLDER_ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}

#: The Gemini key the engine server gets; tests assert it appears in no output, workflow or log.
SECRET_GEMINI_KEY = "AIzaTEST-engine-secret-7f3b9c1d2e"
FAKE_GEMINI = None


def populate_models(models_dir: Path) -> None:
    """The tiny DSD model set in the layout the shipped workflows expect (``tiny-model --comfyui``'s code), plus the
    head-128 set that ComfyUI's own FLUX loader reads (native workflows)."""
    from dsd_core.tiny import reference_image, write_tiny_comfy_models, write_tiny_native_files

    write_tiny_comfy_models(str(models_dir))
    reference_image(seed=0).save(models_dir / "reference.png")
    native = write_tiny_native_files(str(models_dir))
    populate_native_names(models_dir, native)

    from dsd_core.custom_diffusion.tiny import write_tiny_concept  # a concept delta for the custom-diffusion workflow
    from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME

    write_tiny_concept(str(models_dir / "dsd_concepts" / "concept.safetensors"),
                       str(models_dir / "dsd" / DEFAULT_MODEL_NAME), str(models_dir / "diffusers" / DEFAULT_BASE_NAME))


#: The files the shipped native workflows name, as the engine models folder has them (head-128 tiny set; the
#: DSD transformer and DSD LoRA names belong to the DSDFilesLoader workflow's head-16 set, so the native engine
#: tests point those two at the *_h128 files).
NATIVE_WORKFLOW_FILES = {"flux1-dev": "diffusion_models/flux1-dev.safetensors",
                         "c_embedder": "dsd/dsd_c_embedder.safetensors",
                         "style_lora": "loras/flux_style_lora.safetensors"}


def populate_native_names(models_dir: Path, native: dict) -> None:
    """FLUX.1-dev in BFL layout (what users have), the extracted c_embedder patch, a style LoRA."""
    from safetensors.torch import load_file

    from dsd_core.native import extract_c_embedder

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from single_file_convert import transformer_to_bfl, write

    write(models_dir / NATIVE_WORKFLOW_FILES["flux1-dev"],
          transformer_to_bfl(load_file(native["base_transformer"])))
    extract_c_embedder(native["transformer"], models_dir / NATIVE_WORKFLOW_FILES["c_embedder"])
    shutil.copy(native["extra_lora"], models_dir / NATIVE_WORKFLOW_FILES["style_lora"])


def server_environment(root: Path) -> dict:
    """Environment of the server process: a secret Gemini key aimed at a local fake server, a private cache."""
    global FAKE_GEMINI
    if FAKE_GEMINI is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fake_gemini import FakeGemini

        FAKE_GEMINI = FakeGemini("success").__enter__()
        atexit.register(FAKE_GEMINI.__exit__, None, None, None)
    return {"GEMINI_API_KEY": SECRET_GEMINI_KEY, "DSD_GEMINI_BASE_URL": FAKE_GEMINI.base_url,
            "DSD_CACHE_DIR": os.fspath(root / "dsd_cache")}
