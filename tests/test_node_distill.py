"""The distillation nodes end to end on the tiny model: teacher pairs -> build student -> distil (progress + loss
curve) -> generate with the student -> side-by-side comparison."""

from __future__ import annotations

import json
import os

import pytest
import torch

import nodes
from dsd_core.image import pil_to_tensor
from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME
from nodes import _comfy


@pytest.fixture
def comfy_dirs(tiny_model, tmp_path, monkeypatch):
    roots = {_comfy.DSD_FOLDER: [str(tmp_path / "dsd")], _comfy.BASE_FOLDER: [str(tmp_path / "diffusers")]}
    for folder in roots.values():
        os.makedirs(folder[0])
    os.symlink(tiny_model["model"], os.path.join(roots[_comfy.DSD_FOLDER][0], DEFAULT_MODEL_NAME))
    os.symlink(tiny_model["base"], os.path.join(roots[_comfy.BASE_FOLDER][0], DEFAULT_BASE_NAME))
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: roots.get(name, []))
    monkeypatch.setattr(_comfy, "torch_device", lambda: "cpu")
    monkeypatch.setattr(_comfy, "output_dir", lambda: str(tmp_path / "output"))
    return roots


class Bar:
    updates: list = []

    def __init__(self, total):
        self.total = total

    def update_absolute(self, value, total=None, preview=None):
        Bar.updates.append((value, total, preview is not None))


@torch.inference_mode()  # ComfyUI runs every node under inference mode; distilling must still train
def test_distillation_nodes_chain(comfy_dirs, monkeypatch):
    from dsd_core.tiny import reference_image

    monkeypatch.setattr(_comfy, "progress_bar", Bar)
    Bar.updates = []
    get = nodes.NODE_CLASS_MAPPINGS.__getitem__
    teacher = get("DSDModelLoader")().load(DEFAULT_MODEL_NAME, DEFAULT_BASE_NAME, "float32", "full", "exact", False)[0]
    images = pil_to_tensor([reference_image(64, 64, seed=s) for s in (1, 2)])
    (dataset,) = get("DSDTeacherPairs")().make(teacher, images, "a photo of the cat\nthe dog on a red chair", 64, 2, 0)
    assert len(open(os.path.join(dataset, "metadata.jsonl")).read().splitlines()) == 2
    assert get("DSDTeacherPairs")().make(teacher, images, "a photo of the cat\nthe dog on a red chair", 64, 2, 0) \
        == (dataset,)  # same inputs: the folder is reused
    student, info = get("DSDBuildStudent")().build(teacher, "quarter", "", "", "tiny_student")
    assert "1 double blocks" in info and os.path.isfile(os.path.join(student, "transformer", "student.json"))
    handle, folder, curve = get("DSDDistillStudent")().distill(teacher, student, dataset, 2, 1e-4, 0.5, 0.5, 1, 64,
                                                               "tiny_student_distilled")
    assert folder == os.path.join(comfy_dirs[_comfy.DSD_FOLDER][0], "tiny_student_distilled")
    assert [u[0] for u in Bar.updates[-2:]] == [1, 2] and all(u[2] for u in Bar.updates[-2:])  # loss-curve previews
    assert curve.shape[-1] == 3 and curve.shape[0] == 1
    # the distilled student is an ordinary DSD model for the loader and the sampler (its LoRA is fused)
    assert "tiny_student_distilled" in get("DSDModelLoader").INPUT_TYPES()["required"]["model"][0]
    out = get("DSDSampler")().sample(handle, images[:1], "a cat", 0, 2, 3.5, 1.0, 1.0, 64, 1, 1.0)["result"][0]
    assert out.shape == (1, 64, 64, 3) and handle.get().transformer.config.num_layers == 1
    grid, report = get("DSDCompareStudent")().compare(teacher, folder, dataset, 2, 2, 0, 64)
    assert tuple(grid.shape) == (1, 128, 192, 3)
    rep = json.loads(report)
    assert rep["params"] < rep["teacher_params"] and rep["speed"]["ratio"] > 0 and "psnr" in rep
    assert torch.isfinite(grid).all()
