"""Tests of the ComfyUI node adapter nodes/prompt_enhancer.py (no ComfyUI needed).

The node runs against the fake Gemini server on 127.0.0.1. The last test
simulates what ComfyUI saves for a graph that uses the node (API prompt, UI
workflow, history outputs, a SaveImage-style PNG with "prompt"/"workflow" text
chunks) and checks that the API key is in none of them.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import uuid

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fake_gemini import ENHANCED_REPLY, REPO_ROOT, FakeGemini, clean_env  # noqa: F401

from dsd_core.prompt import DEFAULT_GEMINI_MODEL, clean_reply, prepare_reference
from nodes import prompt_enhancer
from nodes.prompt_enhancer import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, DSDPromptEnhancer

pytestmark = pytest.mark.usefixtures("clean_env")

LINK_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING"}
WIDGET_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN"}


def _key() -> str:
    return "AIzaNODE-" + uuid.uuid4().hex


def _b64decode(data: str) -> bytes:
    data = data.translate(str.maketrans("+/", "-_"))
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _image_tensor(batch=2, h=48, w=64, c=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, c, generator=g, dtype=torch.float32)


def _widget_inputs():
    """(name, spec) of every widget input, in INPUT_TYPES order (the order of UI widgets_values)."""
    types = DSDPromptEnhancer.INPUT_TYPES()
    items = list(types["required"].items()) + list(types.get("optional", {}).items())
    return [(name, spec) for name, spec in items if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES]


def _defaults():
    return {name: (spec[1].get("default", spec[0][0]) if len(spec) > 1 else spec[0][0])
            for name, spec in _widget_inputs()}


def test_input_and_return_types_are_well_formed():
    assert NODE_CLASS_MAPPINGS == {"DSDPromptEnhancer": DSDPromptEnhancer}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"DSDPromptEnhancer": "DSD Prompt Enhancer"}
    assert DSDPromptEnhancer.CATEGORY == "DSD/prompt"
    assert callable(getattr(DSDPromptEnhancer, DSDPromptEnhancer.FUNCTION))
    types = DSDPromptEnhancer.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            assert isinstance(name, str) and isinstance(spec, tuple) and 1 <= len(spec) <= 2
            kind = spec[0]
            assert (isinstance(kind, list) and all(isinstance(v, str) for v in kind)) or kind in LINK_TYPES | WIDGET_TYPES
            if len(spec) == 2:
                assert isinstance(spec[1], dict)
                if isinstance(kind, list) and "default" in spec[1]:
                    assert spec[1]["default"] in kind
            lowered = name.lower()
            assert not any(word in lowered for word in ("key", "secret", "token", "password", "credential"))
    assert types["required"]["image"][0] == "IMAGE"
    assert types["required"]["prompt"][0] == "STRING" and types["required"]["prompt"][1]["multiline"]
    assert types["required"]["backend"][0] == ["gemini", "local", "none"]
    assert types["required"]["model"][1]["default"] == DEFAULT_GEMINI_MODEL
    assert types["optional"]["local_model"][0] == "STRING"
    assert DSDPromptEnhancer.RETURN_TYPES == ("STRING", "STRING")
    assert len(DSDPromptEnhancer.RETURN_NAMES) == len(DSDPromptEnhancer.RETURN_TYPES)
    assert DSDPromptEnhancer.RETURN_NAMES[0] == "prompt"
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DSD_GEMINI_KEY_FILE"):
        assert name in DSDPromptEnhancer.DESCRIPTION


def test_module_imports_without_comfy_or_google_genai():
    code = (
        "import sys\n"
        "sys.modules['google'] = None\n"  # no google.* package at all
        "import nodes.prompt_enhancer as m\n"
        "assert 'DSDPromptEnhancer' in m.NODE_CLASS_MAPPINGS\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'folder_paths', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_tensor_to_pil_uses_first_image():
    t = _image_tensor(batch=2)
    t[1] = 0.0
    pil = prompt_enhancer._tensor_to_pil(t)
    assert pil.size == (64, 48) and pil.mode == "RGB"
    expected = (t[0, 0, 0] * 255).round().to(torch.uint8).tolist()
    assert list(pil.getpixel((0, 0))) == expected
    rgba = prompt_enhancer._tensor_to_pil(_image_tensor(batch=1, c=4))
    assert rgba.mode == "RGB"
    gray = prompt_enhancer._tensor_to_pil(_image_tensor(batch=1, c=1))
    assert gray.mode == "RGB"


def test_node_enhances_against_fake_server(monkeypatch):
    key = _key()
    monkeypatch.setenv("GEMINI_API_KEY", key)
    image = _image_tensor()
    with FakeGemini("success") as fake:
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", fake.base_url)
        out = DSDPromptEnhancer().enhance(image, "it on the beach", "gemini", DEFAULT_GEMINI_MODEL, "")
    enhanced = clean_reply(ENHANCED_REPLY)
    assert out["ui"] == {"text": [enhanced]}
    assert out["result"][0] == enhanced and out["result"][1]
    assert fake.request_count == 2
    # The image sent is the first image of the batch, center-cropped to 512².
    part = next(p for p in fake.requests[0]["body"]["contents"][0]["parts"] if "inlineData" in p or "inline_data" in p)
    data = (part.get("inlineData") or part.get("inline_data"))["data"]
    sent = Image.open(io.BytesIO(_b64decode(data))).convert("RGB")
    assert sent.tobytes() == prepare_reference(prompt_enhancer._tensor_to_pil(image)).tobytes()


def test_node_falls_back_and_shows_warning():
    with FakeGemini("success") as fake:  # no key in the environment
        out = DSDPromptEnhancer().enhance(_image_tensor(), "my prompt", "gemini", "", "")
    assert fake.request_count == 0
    assert out["result"] == ("my prompt", "")
    assert out["ui"]["text"] == ["my prompt"] and "no Gemini API key" in out["ui"]["warning"][0]
    out = DSDPromptEnhancer().enhance(_image_tensor(), "my prompt", "none", "", "")
    assert out == {"ui": {"text": ["my prompt"]}, "result": ("my prompt", "")}
    out = DSDPromptEnhancer().enhance(_image_tensor(), "my prompt", "local", "", "no/such/folder")
    assert out["result"][0] == "my prompt" and "not found" in out["ui"]["warning"][0]


def test_saved_artifacts_never_contain_the_key(monkeypatch, tmp_path):
    """Simulate ComfyUI's saved prompt/workflow/history/PNG for a graph using the node, key set in env."""
    key = _key()
    monkeypatch.setenv("GOOGLE_API_KEY", key)
    widgets = _defaults()
    widgets["prompt"] = "this character reading in a library"

    # API format (what is POSTed to /prompt and embedded as the "prompt" PNG chunk).
    api_prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "2": {"class_type": "DSDPromptEnhancer", "inputs": {"image": ["1", 0], **widgets},
              "_meta": {"title": "DSD Prompt Enhancer"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "DSD"}},
    }
    # UI format (what the frontend saves and embeds as the "workflow" PNG chunk); widgets_values positional.
    types = DSDPromptEnhancer.INPUT_TYPES()
    node_inputs = [{"name": "image", "type": "IMAGE", "link": 1}]
    node_inputs += [{"name": n, "type": "STRING" if s[0] == "STRING" else "COMBO", "widget": {"name": n}, "link": None}
                    for n, s in _widget_inputs()]
    workflow = {
        "id": str(uuid.uuid4()), "revision": 0, "last_node_id": 4, "last_link_id": 3,
        "nodes": [
            {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1, 3]}], "widgets_values": ["reference.png", "image"]},
            {"id": 2, "type": "DSDPromptEnhancer", "mode": 0, "inputs": node_inputs,
             "outputs": [{"name": n, "type": t, "links": [2] if i == 0 else []}
                         for i, (n, t) in enumerate(zip(DSDPromptEnhancer.RETURN_NAMES, DSDPromptEnhancer.RETURN_TYPES))],
             "properties": {"Node name for S&R": "DSDPromptEnhancer"},
             "widgets_values": [widgets[n] for n, _ in _widget_inputs()]},
            {"id": 3, "type": "PreviewAny", "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 2}],
             "outputs": [], "widgets_values": []},
            {"id": 4, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
             "outputs": [], "widgets_values": ["DSD"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "STRING"], [3, 1, 0, 4, 0, "IMAGE"]],
        "groups": [], "config": {}, "extra": {}, "version": 0.4,
    }
    assert set(types["required"]) - {"image"} <= set(api_prompt["2"]["inputs"])

    # Execute the node the way the executor would: links resolved, widget values from the API prompt.
    image = _image_tensor(batch=1)
    inputs = {k: v for k, v in api_prompt["2"]["inputs"].items() if k != "image"}
    with FakeGemini("success") as fake:
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", fake.base_url)
        output = getattr(DSDPromptEnhancer(), DSDPromptEnhancer.FUNCTION)(image=image, **inputs)
    assert fake.request_count == 2 and fake.requests[0]["headers"]["x-goog-api-key"] == key  # the key was used
    history = {"prompt_id": {"prompt": [0, "prompt_id", api_prompt, {"extra_pnginfo": {"workflow": workflow}}, ["4"]],
                             "outputs": {"2": output["ui"]}, "status": {"status_str": "success", "completed": True}}}

    # SaveImage: PIL PngInfo text chunks "prompt" and "workflow", json.dumps of each.
    metadata = PngInfo()
    metadata.add_text("prompt", json.dumps(api_prompt))
    metadata.add_text("workflow", json.dumps(workflow))
    array = (image[0].numpy() * 255).round().astype("uint8")
    png_path = tmp_path / "DSD_00001_.png"
    Image.fromarray(array).save(png_path, pnginfo=metadata, compress_level=4)
    (tmp_path / "prompt.json").write_text(json.dumps(api_prompt))
    (tmp_path / "workflow.json").write_text(json.dumps(workflow, indent=2))
    (tmp_path / "history.json").write_text(json.dumps(history))

    reloaded = Image.open(png_path)
    assert json.loads(reloaded.text["prompt"]) == api_prompt
    assert json.loads(reloaded.text["workflow"]) == workflow
    needle = key.encode()
    for path in (png_path, tmp_path / "prompt.json", tmp_path / "workflow.json", tmp_path / "history.json"):
        assert needle not in path.read_bytes(), path.name
    for path in tmp_path.rglob("*"):  # including the prompt cache written during the run
        if path.is_file():
            assert needle not in path.read_bytes(), path
