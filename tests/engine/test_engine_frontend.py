"""The shipped workflows in ComfyUI's real web frontend (headless Chromium), on each engine.

The server is the engine tier's (``conftest.py``) serving the frontend its ComfyUI version pins (``--front-end-root``;
0.3.75: comfyui-frontend-package 1.32.9, 0.33.0: 1.49.6, unpacked by ``.ci/setup_comfy_engine.sh``). In the page:

* every UI workflow loads through ``app.loadGraphData`` with all node types known to the frontend (no missing-node
  dialog or toast, no red nodes), and the frontend's own conversion ``app.graphToPrompt`` gives exactly its API twin
  (``workflows/api/``, what the headless tests POST);
* the native workflows and the DSD Sampler workflows run from the canvas: loaded, then adapted to the tiny models
  through the frontend's node API exactly as the headless tests adapt the API JSON
  (``test_engine_native.engine_prompt``: tiny text encoder / VAE nodes, small panel, few steps), queued with the Run
  button's ``app.queuePrompt(0, 1)``; the saved image carries the workflow, and equals pixel for pixel the same prompt
  POSTed headless (re-executed, not served from the cache);
* a screenshot of the loaded native workflow (``tmp_path``; also into ``$DSD_FRONTEND_SCREENSHOTS`` when set).

Chromium is the system one (``apt-get install chromium``), driven by Playwright; without them the tier is skipped
locally and fails under ``CI=true`` (``.ci/run`` installs both).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from . import test_engine_native as native
from .client import assert_success, message
from .frontend import SETTINGS, Frontend, in_ci, require_browser
from .test_engine_workflows import REFERENCE, engine  # noqa: F401  (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow_checks import api_workflows, ui_workflows  # noqa: E402

NATIVE = ["dsd_native.json", "dsd_native_true_guidance.json", "dsd_native_fp8_loras.json"]
EXACT = ["dsd_basic.json", "dsd_true_guidance.json"]
STEPS, PANEL = 4, 256


@pytest.fixture(scope="module")
def frontend(comfy_engine):
    """One browser page per engine, on the engine's UI, with the reference in the input folder."""
    chromium = require_browser()
    shutil.copy(comfy_engine.models_dir / "reference.png", comfy_engine.input_dir / REFERENCE)
    client = comfy_engine.client()
    status, _ = client.post_json("/settings", SETTINGS)
    assert status == 200
    fe = Frontend(comfy_engine.url, chromium)
    try:
        fe.open("DSDApplyNative")
        yield fe
    finally:
        fe.close()
    # for the log (-s): what the router aborted, e.g. frontend 1.32's node-registry lookups on api.comfy.org
    print(f"frontend {fe.version} on {comfy_engine.name}: {len(fe.blocked)} non-loopback requests aborted")


def strip(prompt: dict) -> dict:
    return {str(k): {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def _load_clean(fe: Frontend, workflow: dict, name: str) -> None:
    report = fe.load(copy.deepcopy(workflow), name)
    problems = {k: report[k] for k in ("unknown", "errors", "missing_text") if report[k]}
    assert not problems, f"{name}: the frontend does not know every node: {problems}\n{fe.diagnostics()}"
    assert report["count"] == len(workflow["nodes"]), report


def test_frontend_is_the_engines_pinned_one(frontend, comfy_engine):
    from .layout import pinned_frontend_version

    pinned = pinned_frontend_version(comfy_engine.spec.comfy_dir)
    if comfy_engine.frontend_root is None:
        msg = (f"the engine serves the installed frontend package ({frontend.version}), not the {pinned} its ComfyUI "
               f"pins: run `bash .ci/setup_comfy_engine.sh` (it unpacks the pinned one)")
        if in_ci():
            pytest.fail("CI=true and " + msg, pytrace=False)
        pytest.skip(msg)
    assert frontend.version == pinned, (frontend.version, pinned)


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_ui_workflow_loads_and_converts_to_its_api_twin(frontend, name):
    _load_clean(frontend, ui_workflows()[name], name)
    assert strip(frontend.graph_to_prompt()) == strip(api_workflows()[name])


def test_a_missing_node_type_is_reported(frontend):
    """The check above can fail: an unknown node type is seen (unregistered, red, and the frontend says so)."""
    wf = copy.deepcopy(ui_workflows()["dsd_native.json"])
    wf["nodes"][0]["type"] = "DSDNoSuchNode"
    try:
        report = frontend.load(wf, "missing")
        assert report["unknown"] == ["DSDNoSuchNode"] and report["errors"] == ["DSDNoSuchNode"], report
        text = report["missing_text"] or frontend.wait_missing_text()
        assert text and "DSDNoSuchNode" in text, report
    finally:
        frontend.open("DSDApplyNative")  # a fresh page: the warning must not stay for the next test


def test_only_loopback_is_reachable_from_the_browser(frontend):
    """Both guards hold: the page's router aborts other hosts, and beneath it Chromium's dead proxy fails them."""
    before = len(frontend.blocked)
    for routed, error in ((True, "ERR_BLOCKED_BY_CLIENT"), (False, "ERR_PROXY_CONNECTION_FAILED")):
        page = frontend.new_page(routed=routed)
        try:
            with pytest.raises(Exception, match=error):
                page.goto("http://dsd-frontend-test.invalid/", timeout=30_000)
        finally:
            page.close()
    assert frontend.blocked[before:] == ["http://dsd-frontend-test.invalid/"]


# ------------------------------------------------------------------------------------------------ runs
def tiny_prompt(name: str, engine, seed: int) -> dict:
    """The shipped API workflow adapted to the engine's tiny models, as the headless engine tests adapt it."""
    api = api_workflows()[name]
    if name in NATIVE:
        prompt, _ = native.engine_prompt(engine, api, steps=STEPS, panel=PANEL, seed=seed)
        del prompt["900"]  # the headless tests' float-tensor output: here the saved PNGs are compared
        return prompt
    prompt = copy.deepcopy(api)
    for node in prompt.values():
        node.pop("_meta", None)
        if node["class_type"] == "DSDSampler":
            node["inputs"].update(steps=STEPS, panel_size=PANEL, seed=seed)
        if node["class_type"] == "DSDImagePrep":
            node["inputs"]["panel_size"] = PANEL
    return prompt


def computing_nodes(prompt: dict) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] in ("DSDSampler", "SamplerCustomAdvanced")]


def executed(entry: dict, prompt: dict) -> set:
    """The run computed its sampler (not served from ComfyUI's cache of an earlier run); returns the cached nodes."""
    cached = {str(n) for n in (message(entry, "execution_cached") or {}).get("nodes", [])}
    assert not cached & set(computing_nodes(prompt)), f"sampler served from the cache: {sorted(cached)}"
    return cached


def saved_png(client, entry: dict, prompt: dict) -> bytes:
    save, = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    images = client.output_images(entry, save)
    assert len(images) == 1, entry["outputs"]
    return client.get_image(images[0]["filename"], images[0]["subfolder"], images[0]["type"])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("name", NATIVE + EXACT)
def test_ui_queued_run_matches_the_api_run(frontend, comfy_engine, comfy, name):
    seed = 1000 + (NATIVE + EXACT).index(name) + (0 if comfy_engine.name == "ci" else 100)
    want = tiny_prompt(name, comfy_engine, seed)
    _load_clean(frontend, ui_workflows()[name], name)
    got = strip(frontend.apply_prompt(want))
    assert got == strip(want), "the canvas edited through the frontend does not give the adapted prompt"

    answer = frontend.queue()
    entry = assert_success(comfy.wait_for(answer["prompt_id"], timeout=600))
    assert strip(entry["prompt"][2]) == strip(want), "the Run button queued another prompt"
    executed(entry, want)
    ui_png = saved_png(comfy, entry, want)
    workflow = json.loads(Image.open(io.BytesIO(ui_png)).text["workflow"])  # the frontend's extra_pnginfo
    assert {n["type"] for n in workflow["nodes"]} >= {v["class_type"] for v in want.values()}

    # the same prompt headless; the prompt text gets a trailing space (removed by the prompt cleaning of both text
    # paths) so that the server computes it again instead of answering from the cache
    api = copy.deepcopy(want)
    text = next(k for k, v in api.items() if v["inputs"].get("prompt"))
    api[text]["inputs"]["prompt"] += " "
    api_entry = assert_success(comfy.run(api, timeout=600))
    cached = executed(api_entry, api)
    loaders = {k for k, v in api.items()
               if v["class_type"] in ("DSDModelLoader", "UNETLoader", "DSDTestTinyUNETLoader")}
    assert loaders and loaders <= cached, f"the cache report is not read right: cached {sorted(cached)}"
    ui, headless = pixels(ui_png), pixels(saved_png(comfy, api_entry, api))
    assert ui.shape == (PANEL, PANEL, 3) and ui.std() > 5, "blank image"
    assert np.array_equal(ui, headless), f"UI run vs API run: max |diff| {np.abs(ui.astype(int) - headless).max()}"


def test_screenshot_of_the_native_workflow(frontend, comfy_engine, tmp_path):
    _load_clean(frontend, ui_workflows()["dsd_native.json"], "dsd_native")
    frontend.page.set_viewport_size({"width": 1920, "height": 1080})
    try:
        path = frontend.screenshot(tmp_path / f"dsd_native_{comfy_engine.name}.png")
    finally:
        frontend.page.set_viewport_size({"width": 1600, "height": 1000})
    with Image.open(path) as im:
        assert im.size == (1920, 1080)
        gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 10, "an empty page"
    out = os.environ.get("DSD_FRONTEND_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, path.name))
