"""Shipped workflows: generated from one source, valid against the nodes, and UI == API."""

import copy
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
    assert set(n[:-5] for n in ui_workflows()) == set(n[:-9] for n in api_workflows())
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
    api = api_workflows()[name.replace(".json", ".api.json")]
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
