"""Model files for the engine tier: filled in before the server starts.

``populate_models(models_dir)`` is called once per engine server (session scope) with an
empty temp models folder that already has the subfolders in ``MODEL_SUBDIRS``.  Write
tiny model files into it (e.g. ``models_dir / "dsd" / "tiny.safetensors"``); every
subfolder that exists when it returns is registered with ComfyUI under its own name.
The 2024 and current folder names are both covered: ``diffusion_models`` is also
registered as ``unet`` and ``text_encoders`` as ``clip`` (the 2024 engine knows only
the old names).  Runs in the pytest process: keep ComfyUI imports out of it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_SUBDIRS = ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "dsd")

# extra ComfyUI folder names that point at the same subfolder
FOLDER_ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}


def populate_models(models_dir: Path) -> None:
    """Default: no models. Replace with the tiny DSD model builder."""
    return None
