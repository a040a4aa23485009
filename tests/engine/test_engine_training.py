"""The shipped training workflow on a real ComfyUI: dataset -> train -> sampler in one graph, loss plot saved, the
trained model folder written where the DSD Model Loader finds it (workflows/dsd_training.api.json, shrunk to a few
steps on 32 px panels)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import uuid
from pathlib import Path

from .client import assert_success

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_training import PANEL, write_pairs  # noqa: E402
from workflow_checks import api_workflows  # noqa: E402


def test_training_workflow_trains_and_samples(comfy_engine, comfy):
    engine = comfy_engine
    tag = uuid.uuid4().hex[:8]
    shutil.copy(engine.models_dir / "reference.png", engine.input_dir / "dsd_reference.png")
    write_pairs(engine.input_dir / f"pairs_{tag}", 4)
    prompt = copy.deepcopy(api_workflows()["dsd_training.api.json"])
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    by_type["DSDTrainingDataset"].update(folder=f"pairs_{tag}", min_image_size=PANEL)
    by_type["DSDTrainLoRA"].update(output_name=f"trained_{tag}", steps=3, batch_size=2, gradient_accumulation=1,
                                   rank=4, alpha=4.0, panel_size=PANEL, base_weights="native", checkpoint_every=2,
                                   validate_every=2, validation_steps=2, gradient_checkpointing=False)
    by_type["DSDSampler"].update(steps=2, panel_size=256)
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] += "_" + tag
    entry = assert_success(comfy.run(prompt, timeout=600))
    saved = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert all(comfy.output_images(entry, k) for k in saved), entry["outputs"]
    folder = engine.models_dir / "dsd" / f"trained_{tag}"
    link = json.loads((folder / "transformer" / "dsd_link.json").read_text())
    assert Path(link["base_transformer"]).name == "transformer"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert [line.split(",")[0] for line in (folder / "logs" / "loss.csv").read_text().split()] == ["step", "1", "2", "3"]
