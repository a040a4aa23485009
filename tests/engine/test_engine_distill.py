"""The shipped distillation workflow on a real ComfyUI, with its step counts and sizes reduced to seconds:
teacher pairs -> student -> distil -> sample with the student -> comparison grid."""

from __future__ import annotations

import numpy as np

from .client import assert_success
from .test_engine_workflows import TRAINING_WORKFLOWS, api_workflows, engine, saved_image, unique  # noqa: F401


def quick(prompt: dict) -> dict:
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in ("DSDTeacherPairs", "DSDDistillStudent", "DSDCompareStudent"):
            inputs.update(panel_size=64, steps=2)
        if kind == "DSDSampler":
            inputs.update(panel_size=256, steps=2)
    return prompt


def test_distill_workflow_runs(engine, comfy):  # noqa: F811
    assert "dsd_distill.api.json" in TRAINING_WORKFLOWS  # not in the generic pixel test
    prompt = quick(unique(api_workflows()["dsd_distill.api.json"]))
    entry = assert_success(comfy.run(prompt, timeout=900))
    saves = {v["inputs"]["filename_prefix"].rsplit("_", 1)[0]: k for k, v in prompt.items()
             if v["class_type"] == "SaveImage"}
    student_image, _ = saved_image(comfy, entry, saves["dsd_distill_student"])
    assert student_image.shape == (256, 256, 3) and student_image.std() > 5
    grid, _ = saved_image(comfy, entry, saves["dsd_distill_compare"])
    assert grid.shape == (64, 192, 3)  # one pair: reference | teacher | student
    assert np.abs(grid[:, 64:128].astype(int) - grid[:, 128:].astype(int)).mean() > 0
    assert (engine.models_dir / "dsd" / "dsd_student_distilled" / "transformer" / "student.json").is_file()
