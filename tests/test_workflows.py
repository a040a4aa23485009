"""Shipped workflows: generated from one source, valid against the nodes, and UI == API."""

import copy
import glob
import io
import itertools
import os
import subprocess
import sys

import pytest

import nodes
from conftest import ROOT
from workflow_checks import (api_workflows, check_ui_workflow, object_info_from_classes, ui_to_api,
                             ui_workflows)

# the core ComfyUI nodes the workflows use, as /object_info describes them (checked against a real engine in
# tests/engine/test_engine_workflows.py)
CORE = {
    "LoadImage": {"input": {"required": {"image": [["dsd_reference.png"], {"image_upload": True}]}},
                  "output": ["IMAGE", "MASK"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "output": []},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": []},
    # the native workflows' stock nodes (ComfyUI 0.3.75 / 0.33; checked against the real servers in the engine tier)
    "UNETLoader": {"input": {"required": {"unet_name": [["flux1-dev.safetensors", "dsd_transformer.safetensors"]],
                                          "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]]}},
                   "output": ["MODEL"]},
    "LoraLoaderModelOnly": {"input": {"required": {
        "model": ["MODEL"], "lora_name": [["dsd_lora.safetensors", "flux_style_lora.safetensors"]],
        "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}]}}, "output": ["MODEL"]},
    "DualCLIPLoader": {"input": {"required": {"clip_name1": [["clip_l.safetensors", "t5xxl_fp16.safetensors"]],
                                              "clip_name2": [["clip_l.safetensors", "t5xxl_fp16.safetensors"]],
                                              "type": [["sdxl", "sd3", "flux"]]},
                                 "optional": {"device": [["default", "cpu"], {"advanced": True}]}},
                       "output": ["CLIP"]},
    "VAELoader": {"input": {"required": {"vae_name": [["ae.safetensors"]]}}, "output": ["VAE"]},
    "RandomNoise": {"input": {"required": {"noise_seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1,
                                                                  "control_after_generate": True}]}},
                    "output": ["NOISE"]},
    "KSamplerSelect": {"input": {"required": {"sampler_name": [["euler", "heun", "dpmpp_2m"]]}}, "output": ["SAMPLER"]},
    "SamplerCustomAdvanced": {"input": {"required": {"noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"],
                                                     "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]}},
                              "output": ["LATENT", "LATENT"]},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}, "output": ["IMAGE"]},
}


@pytest.fixture(scope="module")
def object_info():
    return {**CORE, **object_info_from_classes(nodes.NODE_CLASS_MAPPINGS)}


def test_workflows_are_generated_from_their_source():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "workflows", "make_workflows.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert set(ui_workflows()) == set(api_workflows())
    assert {"dsd_basic.json", "dsd_true_guidance.json", "dsd_native.json", "dsd_native_true_guidance.json",
            "dsd_native_fp8_loras.json"} <= set(ui_workflows())


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_ui_workflow_is_valid(name, object_info):
    ui = ui_workflows()[name]
    assert check_ui_workflow(ui, object_info) == []
    assert any(n["type"] == "Note" for n in ui["nodes"]), "each UI workflow explains its knobs in a note"


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_ui_and_api_formats_agree(name, object_info):
    ui = ui_workflows()[name]
    api = api_workflows()[name]
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui_to_api(ui, object_info) == strip


def test_checker_catches_mistakes(object_info):
    """The checker itself fails on the mistakes it exists for."""
    ui = ui_workflows()["dsd_basic.json"]
    sampler = next(n for n in ui["nodes"] if n["type"] == "DSDSampler")

    def broken(mutate):
        bad = copy.deepcopy(ui)
        mutate(bad, next(n for n in bad["nodes"] if n["id"] == sampler["id"]))
        return check_ui_workflow(bad, object_info)

    assert broken(lambda ui, n: n["widgets_values"].pop())  # a missing widget value
    assert broken(lambda ui, n: n["widgets_values"].__setitem__(3, 999))  # steps above max (prompt, seed, control, steps)
    assert broken(lambda ui, n: n["widgets_values"].__setitem__(2, "sometimes"))  # bad control-after-generate
    assert broken(lambda ui, n: n.__setitem__("type", "DSDNoSuchNode"))
    assert broken(lambda ui, n: ui["links"].pop())  # a dangling link


# ------------------------------------------------------------------ ComfyUI's face: Templates browser, thumbnails, notes
sys.path.insert(0, os.path.join(ROOT, "workflows"))
import make_workflows as mw  # noqa: E402


def test_templates_folder_holds_only_ui_workflows_with_thumbnails():
    """ComfyUI lists custom_nodes/<pack>/workflows/*.json as templates and shows <name>.jpg as the thumbnail."""
    from PIL import Image

    listed = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "workflows", "*.json")))
    assert listed == sorted(f"{g}.json" for g in mw.GRAPHS)
    for name in listed:
        ui = ui_workflows()[name]
        assert {"nodes", "links"} <= set(ui), f"{name} is not a UI workflow"
        with Image.open(os.path.join(ROOT, "workflows", name[:-5] + ".jpg")) as im:
            assert (im.format, im.size) == ("JPEG", (mw.THUMBNAIL_SIZE, mw.THUMBNAIL_SIZE))
    assert not glob.glob(os.path.join(ROOT, "workflows", "*", "*.jpg"))


def test_thumbnail_is_drawn_from_the_graph_deterministically():
    nodes, notes = mw.basic()
    ui = mw.to_ui(nodes, notes)
    a = mw.thumbnail(ui)
    assert a == mw.thumbnail(copy.deepcopy(ui))
    assert mw.jpeg_comment(a) == mw.thumbnail_fingerprint(ui)
    changes = [lambda u: next(n for n in u["nodes"] if n["type"] == "DSDSampler")["pos"].__setitem__(1, 150),
               lambda u: next(n for n in u["nodes"] if n["type"] == "DSDSampler")["size"].__setitem__(1, 500),
               lambda u: next(n for n in u["nodes"] if n["type"] == "DSDSampler").__setitem__("title", "DSD Samplers"),
               lambda u: u["links"].pop()]
    for change in changes:
        other = copy.deepcopy(ui)
        change(other)
        assert not mw.same_thumbnail(a, mw.thumbnail(other))
    # another JPEG encoder's bytes for the same drawing count as current (the fingerprint is in the comment)
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(a)).save(buf, format="JPEG", quality=85, comment=mw.jpeg_comment(a).encode())
    assert buf.getvalue() != a and mw.same_thumbnail(buf.getvalue(), a)
    # and the picture shows the graph: a title-bar pixel of the sampler is the title colour, a far corner background
    im = mw.render_thumbnail(ui)
    box = next(s for s in mw.thumbnail_shapes(ui) if s[0] == "box" and s[1] == mw.THEME["title"])
    pixel = im.getpixel((box[5] // 2 - 6, (box[4] + box[6]) // 4))  # right end of the title bar, clear of the text
    assert max(abs(a - b) for a, b in zip(pixel, mw.THEME["title"])) <= 3, pixel
    assert im.getpixel((16, 16)) == mw.THEME["background"]  # between grid lines, outside the graph


def test_check_reports_stale_and_stray_files(tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(os.path.join(ROOT, "workflows"), tmp_path / "workflows")
    monkeypatch.setattr(mw, "HERE", str(tmp_path / "workflows"))
    assert mw.main(["--check"]) == 0
    (tmp_path / "workflows" / "dsd_basic.jpg").write_bytes(mw.thumbnail(mw.to_ui(*mw.comfy_files())))
    (tmp_path / "workflows" / "old.api.json").write_text("{}")
    assert mw.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "dsd_basic.jpg" in err and "old.api.json" in err
    assert mw.main([]) == 0 and mw.main(["--check"]) == 0
    assert not (tmp_path / "workflows" / "old.api.json").exists()


def _rects(ui):
    """(id, type, x0, y0, x1, y1) of every node including its title bar, in canvas units."""
    return [(n["id"], n["type"], n["pos"][0], n["pos"][1] - mw.TITLE_HEIGHT, n["pos"][0] + n["size"][0],
             n["pos"][1] + n["size"][1]) for n in ui["nodes"]]


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_notes_are_readable_in_the_first_view_and_nothing_overlaps(name):
    ui = ui_workflows()[name]
    rects = _rects(ui)
    for a, b in itertools.combinations(rects, 2):
        overlap = min(a[4], b[4]) > max(a[2], b[2]) and min(a[5], b[5]) > max(a[3], b[3])
        assert not overlap, f"{name}: {a[1]} #{a[0]} and {b[1]} #{b[0]} overlap"
    notes = [r for r in rects if r[1] == "Note"]
    assert notes
    ds = ui["extra"]["ds"]
    width, height = mw.FIRST_VIEW
    for scale, (ox, oy) in ((1.0, (0, 0)), (ds["scale"], ds["offset"])):  # frontends that ignore / apply extra.ds
        for _, _, x0, y0, x1, y1 in notes:
            assert 0 <= (x0 + ox) * scale and (x1 + ox) * scale <= width, f"{name}: a note is outside the first view"
            assert 0 <= (y0 + oy) * scale and (y1 + oy) * scale <= height, f"{name}: a note is outside the first view"
    for n in ui["nodes"]:
        if n["type"] == "Note":
            need = mw.note_lines(n["widgets_values"][0], n["size"][0]) * mw.NOTE_LINE_H + mw.NOTE_PAD
            assert n["size"][1] >= need, f"{name}: note text needs {need} px, the note is {n['size'][1]}"


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_nodes_are_tall_enough_for_their_widgets(name, object_info):
    """LiteGraph grows a node that is too small for its slots and widgets, which would push it over its neighbours."""
    for n in ui_workflows()[name]["nodes"]:
        if n["type"] == "Note":
            continue
        info = object_info[n["type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        multiline = sum(1 for v in spec.values() if len(v) > 1 and isinstance(v[1], dict) and v[1].get("multiline"))
        need = 20 * max(len(n["inputs"]), len(n["outputs"])) + 24 * len(n["widgets_values"]) + 60 * multiline + 8
        if n["type"] in ("LoadImage", "PreviewImage", "SaveImage"):
            need += 200  # the image preview
        assert n["size"][1] >= need, f"{name}: {n['type']} is {n['size'][1]} px tall, needs ~{need}"


def test_note_line_estimate():
    per_line = (200 - mw.NOTE_PAD) // mw.NOTE_CHAR_W  # 20 characters
    assert per_line == 20
    assert mw.note_lines("a b", 200) == 1
    assert mw.note_lines("a\n\nb", 200) == 3
    assert mw.note_lines(" ".join(["word"] * 100), 200) == 25  # 4 words (19 characters) a line
    assert mw.note_lines("x" * 60, 200) == 3
    assert mw.note_lines("x" * 61, 200) == 4
