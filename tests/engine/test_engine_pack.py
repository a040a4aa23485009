"""Our pack (the repo root, symlinked as custom_nodes/ComfyUI-SelfDistill) loads in the engine."""

from __future__ import annotations

import os

import pytest

from .layout import PACK_DIR, PACK_NAME, pack_has_init


def _pack_log_problems(log: str) -> list[str]:
    bad = []
    for line in log.splitlines():
        if PACK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line
                                  or "Skip " in line and "NODE_CLASS_MAPPINGS" in line):
            bad.append(line)
    return bad


def test_object_info_responds(comfy):
    info = comfy.object_info()
    assert isinstance(info, dict) and "SaveImage" in info


def test_pack_loads_without_import_failure(comfy, comfy_engine):
    if not pack_has_init():
        pytest.skip(f"{PACK_DIR}/__init__.py does not exist yet: the pack is not linked into the engine")
    assert comfy_engine.pack_linked
    log = comfy_engine.log_text()
    problems = _pack_log_problems(log)
    assert not problems, "pack failed to load:\n" + "\n".join(problems) + "\n" + comfy_engine.log_tail(80)
    # the import-times table lists the pack as loaded
    listed = [line for line in log.splitlines() if line.rstrip().endswith(os.sep + PACK_NAME)]
    assert listed and not any("IMPORT FAILED" in line for line in listed), listed

    # the module ComfyUI imported from our __init__.py, and its NODE_CLASS_MAPPINGS
    modules = comfy.get_json("/dsd_probe/custom_node_modules")
    ours = [m for m in modules if os.path.realpath(m["file"]) == os.path.realpath(PACK_DIR / "__init__.py")]
    assert len(ours) == 1, f"our pack module not found among {[m['module'] for m in modules]}"
    info = comfy.object_info()
    missing = [n for n in ours[0]["nodes"] if n not in info]
    assert not missing, f"pack nodes missing from /object_info: {missing}"
