"""Model files and environment for the engine tier, prepared before each server starts.

``populate_models(models_dir)`` is called once per engine server (session scope) with an empty temp models folder
that already has the subfolders in ``MODEL_SUBDIRS``; every subfolder that exists when it returns is registered with
ComfyUI under its own name (``diffusion_models`` also as ``unet``, ``text_encoders`` also as ``clip``). It writes the
tiny DSD model set under the standard names the shipped workflows use: ``dsd/dsd_model`` and
``diffusers/FLUX.1-dev``, and again as single files (``diffusion_models/dsd_transformer.safetensors``,
``loras/dsd_lora.safetensors``, ``text_encoders/clip_l.safetensors`` + ``t5xxl_fp16.safetensors``, ``vae/ae.safetensors``,
tiny tokenizers in ``dsd/tokenizers``). Runs in the pytest process: keep ComfyUI imports out of it.

``server_environment(root)`` returns extra environment variables for the server process: a Gemini API key that
must never leak, pointed at a fake Gemini server on 127.0.0.1 (``FAKE_GEMINI``) started for the session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from pathlib import Path

MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "dsd", "diffusers", "dsd_concepts")

# extra ComfyUI folder names that point at the same subfolder
FOLDER_ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}

#: The Gemini key the engine server gets; tests assert it appears in no output, workflow or log.
SECRET_GEMINI_KEY = "AIzaTEST-engine-secret-7f3b9c1d2e"
FAKE_GEMINI = None


def populate_models(models_dir: Path) -> None:
    """Write the tiny DSD model set as models/dsd/dsd_model and models/diffusers/FLUX.1-dev."""
    from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME
    from dsd_core.tiny import write_tiny_comfy_files, write_tiny_model

    parts = write_tiny_model(str(models_dir / ".tiny"))
    shutil.move(parts["model"], models_dir / "dsd" / DEFAULT_MODEL_NAME)
    shutil.move(parts["base"], models_dir / "diffusers" / DEFAULT_BASE_NAME)
    shutil.move(parts["reference"], models_dir / "reference.png")
    shutil.rmtree(models_dir / ".tiny")
    write_tiny_comfy_files(str(models_dir))  # the same weights as ComfyUI single files
    from dsd_core.custom_diffusion.tiny import write_tiny_concept  # a concept delta for the custom-diffusion workflow

    write_tiny_concept(str(models_dir / "dsd_concepts" / "concept.safetensors"),
                       str(models_dir / "dsd" / DEFAULT_MODEL_NAME), str(models_dir / "diffusers" / DEFAULT_BASE_NAME))


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
