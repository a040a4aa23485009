"""Unit tier: every node's interface is well formed, and every node runs on the tiny model set (no ComfyUI)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nodes
from conftest import ROOT
from dsd_core.image import pil_to_tensor, prepare_reference, tensor_to_pil
from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME
from nodes import _comfy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.mark.parametrize("name", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_node_interface(name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    assert cls.CATEGORY.startswith("DSD/")
    assert name in nodes.NODE_DISPLAY_NAME_MAPPINGS and "unavailable" not in nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    for group in ("required", "optional"):
        for inp, entry in spec.get(group, {}).items():
            typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            assert isinstance(opts, dict), inp
            if isinstance(typ, list):
                assert typ and all(isinstance(v, str) for v in typ), inp
                assert opts.get("default", typ[0]) in typ, inp
            elif typ in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], inp
            else:
                assert isinstance(typ, str), inp
    assert cls.DESCRIPTION


def test_no_api_key_widget_anywhere():
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        for group in cls.INPUT_TYPES().values():
            assert not [k for k in group if "key" in k.lower() or "token" in k.lower()]


@pytest.fixture
def comfy_models(tiny_model, tmp_path, monkeypatch):
    """models/dsd/dsd_model and models/diffusers/FLUX.1-dev holding the tiny model set."""
    dsd_root, base_root = tmp_path / "dsd", tmp_path / "diffusers"
    dsd_root.mkdir()
    base_root.mkdir()
    os.symlink(tiny_model["model"], dsd_root / DEFAULT_MODEL_NAME)
    os.symlink(tiny_model["base"], base_root / DEFAULT_BASE_NAME)
    roots = {_comfy.DSD_FOLDER: [str(dsd_root)], _comfy.BASE_FOLDER: [str(base_root)]}
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: roots.get(name, []))
    monkeypatch.setattr(_comfy, "torch_device", lambda: "cpu")
    return roots


def _load(**kw):
    args = dict(model=DEFAULT_MODEL_NAME, base=DEFAULT_BASE_NAME, dtype="float32", memory="full", speed="exact",
                download_missing=False)
    args.update(kw)
    return nodes.NODE_CLASS_MAPPINGS["DSDModelLoader"]().load(**args)[0]


def _sample(handle, image, **kw):
    args = dict(prompt="a cat on a red chair", seed=3, steps=2, guidance=3.5, image_guidance=1.0,
                text_guidance=1.0, panel_size=256, batch_size=1, lora_scale=1.0)
    args.update(kw)
    return nodes.NODE_CLASS_MAPPINGS["DSDSampler"]().sample(handle, image, **args)


def test_loader_lists_and_loads(comfy_models):
    spec = nodes.NODE_CLASS_MAPPINGS["DSDModelLoader"].INPUT_TYPES()["required"]
    assert spec["model"][0][0] == DEFAULT_MODEL_NAME and spec["base"][0][0] == DEFAULT_BASE_NAME
    handle = _load()
    assert handle.loaded and handle.get().transformer.dtype == torch.float32


def test_loader_missing_model_explains(comfy_models, tmp_path, monkeypatch):
    from dsd_core.errors import ModelNotFoundError

    monkeypatch.setattr(_comfy, "folder_roots", lambda name: [str(tmp_path / "empty")])
    with pytest.raises(ModelNotFoundError, match="dsd_model not found: put the transformer/ folder .* download_missing"):
        _load()
    with pytest.raises(ModelNotFoundError, match="other not found"):
        _load(model="other", download_missing=True)


def test_loader_download_goes_through_the_hub_and_explains_offline(comfy_models, tmp_path, monkeypatch):
    from dsd_core.errors import ModelNotFoundError

    monkeypatch.setattr(_comfy, "folder_roots", lambda name: [str(tmp_path / "fresh" / name)])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="cannot get the DSD weights from primecai/dsd_model"):
        _load(download_missing=True)


def test_sampler_matches_core_and_reports_progress(comfy_models, tiny_pipe, monkeypatch):
    from dsd_core.tiny import reference_image

    image = pil_to_tensor(reference_image(seed=9))
    calls = []
    monkeypatch.setattr(_comfy, "check_interrupt", lambda: calls.append("check"))
    handle = _load()
    images, refs, prompt = _sample(handle, image, batch_size=2, image_guidance=1.5)
    assert images.shape == (2, 256, 256, 3) and refs.shape == (2, 256, 256, 3) and prompt == "a cat on a red chair"
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert calls.count("check") == 3  # before the run and after each of the 2 steps
    ref = prepare_reference(tensor_to_pil(image)[0], 256, 256)
    direct = tiny_pipe(ref, "a cat on a red chair", height=256, width=512, num_inference_steps=2, seed=3,
                       num_images_per_prompt=2, image_guidance_scale=1.5, output_type="pt")
    assert torch.equal(images, direct.images.permute(0, 2, 3, 1))


def test_sampler_interrupt_stops_within_a_step(comfy_models, monkeypatch):
    from dsd_core.tiny import reference_image

    class Interrupted(Exception):
        pass

    checks = []

    def interrupt():
        checks.append(1)
        if len(checks) == 2:  # after the first step
            raise Interrupted

    monkeypatch.setattr(_comfy, "check_interrupt", interrupt)
    with pytest.raises(Interrupted):
        _sample(_load(), pil_to_tensor(reference_image(seed=1)), steps=5)
    assert len(checks) == 2


def test_unload_releases_and_next_use_reloads(comfy_models):
    from dsd_core.tiny import reference_image

    handle = _load()
    nodes.NODE_CLASS_MAPPINGS["DSDUnloadModel"]().unload(handle)
    assert not handle.loaded
    images, _, _ = _sample(handle, pil_to_tensor(reference_image(seed=2)), steps=1)
    assert handle.loaded and images.shape == (1, 256, 256, 3)


def test_image_prep_node():
    from dsd_core.tiny import reference_image

    batch = torch.cat([pil_to_tensor(reference_image(300, 200, seed=s)) for s in (1, 2)])
    (out,) = nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"]().prepare(batch, "pad", "bicubic", 128, "black")
    assert out.shape == (2, 128, 128, 3)
    (crop,) = nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"]().prepare(batch[:1], "center_crop", "bicubic", 512, "white")
    want = np.asarray(prepare_reference(tensor_to_pil(batch[:1])[0]), dtype=np.float32) / 255
    np.testing.assert_array_equal(crop[0].numpy(), want)


def test_pack_loads_without_optional_and_core_dependencies():
    """Without diffusers (or google-genai) ComfyUI still starts: the affected nodes say what to install."""
    code = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "google"):
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("ComfyUI_SelfDistill", {os.path.join(ROOT, "__init__.py")!r},
                                              submodule_search_locations=[{ROOT!r}])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
m = pack.NODE_CLASS_MAPPINGS
assert set(m) >= {{"DSDModelLoader", "DSDSampler", "DSDImagePrep", "DSDPromptEnhancer", "DSDUnloadModel"}}, m
assert "unavailable" in pack.NODE_DISPLAY_NAME_MAPPINGS["DSDSampler"]
assert "unavailable" not in pack.NODE_DISPLAY_NAME_MAPPINGS["DSDImagePrep"]
try:
    m["DSDSampler"]().run()
except RuntimeError as e:
    assert "diffusers" in str(e) and "pip install -r" in str(e), e
    print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


def test_files_loader_runs_from_comfyui_single_files(tmp_path, monkeypatch, make_pipe):
    """DSD from clip_l / t5xxl / ae / one transformer file / LoRA, as ComfyUI keeps them; nothing downloaded."""
    from dsd_core.sources import FilesSource
    from dsd_core.tiny import reference_image, write_tiny_comfy_files

    paths = write_tiny_comfy_files(str(tmp_path / "models"))
    m = tmp_path / "models"
    roots = {"unet": [str(m / "diffusion_models")], "loras": [str(m / "loras")], "clip": [str(m / "text_encoders")],
             "vae": [str(m / "vae")], _comfy.DSD_FOLDER: [str(m / "dsd")]}
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: roots.get(name, []))
    monkeypatch.setattr(_comfy, "torch_device", lambda: "cpu")
    cls = nodes.NODE_CLASS_MAPPINGS["DSDFilesLoader"]
    handle = cls().load(transformer="dsd_transformer.safetensors", lora="dsd_lora.safetensors",
                        clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors", vae="ae.safetensors",
                        dtype="float32", memory="full", speed="exact")[0]
    image = pil_to_tensor(reference_image(seed=4))
    images, _, _ = _sample(handle, image)
    direct = make_pipe(source=FilesSource(paths["transformer"], paths["clip_l"], paths["t5xxl"], paths["vae"],
                                          lora=paths["lora"], tokenizers=paths["tokenizers"]))
    want = direct(prepare_reference(tensor_to_pil(image)[0], 256, 256), "a cat on a red chair", height=256,
                  width=512, num_inference_steps=2, seed=3, output_type="pt").images
    assert torch.equal(images, want.permute(0, 2, 3, 1))
    from dsd_core.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="vae file missing.safetensors not found"):
        cls().load(transformer="dsd_transformer.safetensors", lora="dsd_lora.safetensors", clip_l="clip_l.safetensors",
                   t5xxl="t5xxl_fp16.safetensors", vae="missing.safetensors", dtype="float32", memory="full", speed="exact")


def test_dropping_the_handle_frees_the_pipeline(comfy_models, caplog):
    """ComfyUI's "free memory" clears its output cache, which holds the only reference to the handle."""
    import gc
    import logging
    import weakref

    handle = _load()
    pipe = weakref.ref(handle.get())
    with caplog.at_level(logging.INFO, logger="dsd_core.model_store"):
        del handle
        gc.collect()
    assert pipe() is None
    assert "released the DSD model" in caplog.text


def test_loader_memory_and_speed_settings_reach_the_pipeline(comfy_models):
    from dsd_core.memory import MemoryConfig
    from dsd_core.speed import SpeedConfig

    handle = _load(memory="16gb", speed="fast")
    assert handle.spec.memory == MemoryConfig.from_preset("16gb") and handle.spec.speed == SpeedConfig.fast()
    pipe = handle.get()
    assert pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert pipe.transformer.is_cache_enabled and "speed" in pipe.call_hooks


def test_loader_widgets_are_typed_at_once(tmp_path, monkeypatch):
    """Every choice a loader offers is a valid typed setting; a bad value (e.g. from an edited API workflow) fails
    before any folder is looked at, naming the choices."""
    from dsd_core.errors import DSDError
    from dsd_core.memory import MemoryConfig
    from dsd_core.options import parse_dtype
    from dsd_core.speed import SpeedConfig

    for name in ("DSDModelLoader", "DSDFilesLoader"):
        spec = nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
        assert [MemoryConfig.from_name(m).preset for m in spec["memory"][0]] == spec["memory"][0]
        assert all(isinstance(SpeedConfig.from_name(v), SpeedConfig) for v in spec["speed"][0])
        assert [parse_dtype(d) for d in spec["dtype"][0]] == [None, torch.bfloat16, torch.float16, torch.float32]
        assert "model offload" in spec["memory"][1]["tooltip"] and "First Block Cache" in spec["speed"][1]["tooltip"]
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: [str(tmp_path / "empty")])
    for bad, says in ((dict(memory="huge"), "unknown memory preset 'huge'; use one of full"),
                      (dict(speed="turbo"), "unknown speed mode 'turbo'"), (dict(dtype="int8"), "unknown dtype")):
        with pytest.raises(DSDError, match=says):
            _load(**bad)


def test_make_room_unloads_comfyui_models_only_for_the_gpu(monkeypatch):
    import types

    calls = []
    mm = types.SimpleNamespace(unload_all_models=lambda: calls.append("unload"),
                               soft_empty_cache=lambda: calls.append("empty"))
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    _comfy.make_room("cpu")
    assert calls == []
    _comfy.make_room("cuda:0")
    assert calls == ["unload", "empty"]
