"""ComfyUI's Templates browser: it lists only our UI workflows, and each one's thumbnail and JSON are served.

The frontend (comfyui_frontend_package) asks ``GET /workflow_templates`` for ``{pack folder: [names]}`` and then shows
``/api/workflow_templates/<pack>/<name>.jpg`` as the thumbnail and loads ``.../<name>.json`` when clicked.
ComfyUI versions before the Templates browser (the 2024 engine) have no such route: skipped there, with the reason.
"""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from .layout import PACK_DIR, PACK_NAME, pack_has_init

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from workflow_checks import WORKFLOWS_DIR, api_workflows, ui_workflows  # noqa: E402


def _has_templates_browser(comfy_engine) -> bool:
    return (comfy_engine.spec.comfy_dir / "app" / "custom_node_manager.py").is_file()


def test_templates_browser_lists_only_ui_workflows_with_thumbnails(comfy, comfy_engine):
    if not _has_templates_browser(comfy_engine):
        pytest.skip(f"ComfyUI in {comfy_engine.spec.comfy_dir} has no Templates browser (no app/custom_node_manager.py)")
    assert pack_has_init() and comfy_engine.pack_linked, f"{PACK_DIR} is not linked into the engine"
    listed = comfy.get_json("/workflow_templates")
    assert PACK_NAME in listed, f"our pack is not in the Templates browser: {sorted(listed)}"
    ours = sorted(listed[PACK_NAME])
    assert ours == sorted(n[:-5] for n in ui_workflows()), ours
    assert not any(name in ours for name in ("api",) + tuple(n[:-5] + ".api" for n in api_workflows()))

    from PIL import Image

    for name in ours:
        status, raw, headers = comfy.request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert status == 200, f"thumbnail of {name}: HTTP {status}"
        assert headers.get("Content-Type", "").startswith("image/jpeg"), headers
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "JPEG" and im.width > 100
        status, raw, _ = comfy.request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert status == 200 and json.loads(raw) == ui_workflows()[name + ".json"]
    # headless users still find the API workflows under the pack's folder (not listed as templates)
    first = sorted(api_workflows())[0]
    status, raw, _ = comfy.request("GET", f"/api/workflow_templates/{PACK_NAME}/api/{first}")
    assert status == 200 and json.loads(raw) == api_workflows()[first]
    assert os.path.isdir(os.path.join(WORKFLOWS_DIR, "api"))


def test_sampler_notes_reach_the_history(comfy, comfy_engine):
    """A cut prompt is reported by the sampler in the node's UI output (V1 {"ui": {"text": ...}}), not only logged."""
    import copy
    import uuid

    from .client import assert_success

    prompt = copy.deepcopy(api_workflows()["dsd_basic.json"])
    prompt["3"]["inputs"].update(steps=1, panel_size=64, seed=5,
                                 prompt=f"a cat on a red chair {uuid.uuid4().hex} " + "a cat on a red chair " * 30)
    entry = assert_success(comfy.run(prompt, timeout=300))
    notes = entry["outputs"]["3"]["text"]
    assert any(n.startswith("prompt truncated for CLIP: it is") for n in notes), notes
