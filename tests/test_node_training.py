"""The training nodes on the tiny model set (no ComfyUI): dataset -> train (cancel, resume) -> sampler, save, plot."""

from __future__ import annotations

import os

import pytest
import torch

import nodes
from dsd_core.model_store import DEFAULT_BASE_NAME
from dsd_core.training import TrainingCancelled
from dsd_core.training.engine import read_loss_csv
from nodes import _comfy
from test_training import CAPTION, PANEL, write_pairs


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def comfy(tiny_model, tmp_path, monkeypatch):
    dsd_root, base_root = tmp_path / "models" / "dsd", tmp_path / "models" / "diffusers"
    dsd_root.mkdir(parents=True)
    base_root.mkdir(parents=True)
    os.symlink(tiny_model["base"], base_root / DEFAULT_BASE_NAME)
    roots = {_comfy.DSD_FOLDER: [str(dsd_root)], _comfy.BASE_FOLDER: [str(base_root)]}
    monkeypatch.setattr(_comfy, "folder_roots", lambda name: roots.get(name, []))
    monkeypatch.setattr(_comfy, "torch_device", lambda: "cpu")
    return dict(dsd=str(dsd_root), data=write_pairs(tmp_path / "pairs", 4))


def _train(dataset, **kw):
    args = dict(base=DEFAULT_BASE_NAME, start_from="FLUX (fresh c_embedder + LoRA)", output_name="trained",
                steps=4, learning_rate=1e-3, batch_size=2, gradient_accumulation=1, rank=4, alpha=4.0,
                lora_targets="attention", panel_size=PANEL, base_weights="native", run_seed=0, resume=True, checkpoint_every=2,
                validate_every=2, validation_steps=2, gradient_checkpointing=False, dtype="float32")
    args.update(kw)
    return nodes.NODE_CLASS_MAPPINGS["DSDTrainLoRA"]().train(dataset, **args)


def test_train_cancel_resume_sample_save_plot(comfy, monkeypatch, reference_image):
    from dsd_core.image import pil_to_tensor

    reference_image = pil_to_tensor(reference_image)
    node_map = nodes.NODE_CLASS_MAPPINGS
    dataset = node_map["DSDTrainingDataset"]().load(comfy["data"], "reference", "target", "caption", PANEL)[0]
    assert dataset["pairs"] == 4

    calls = []

    def interrupt_at_step_3():  # the Cancel button, pressed during step 3
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("Processing interrupted")

    monkeypatch.setattr(_comfy, "check_interrupt", interrupt_at_step_3)
    with pytest.raises(TrainingCancelled):
        _train(dataset)
    output = os.path.join(comfy["dsd"], "trained")
    assert os.path.isdir(os.path.join(output, "checkpoints", "step-00000003"))  # saved before stopping

    monkeypatch.setattr(_comfy, "check_interrupt", lambda: None)
    handle, loss, folder, steps = _train(dataset)  # resume=True continues from step 3
    assert (folder, steps) == (output, 4)
    assert loss["steps"] == [1, 2, 3, 4] and len(loss["loss"]) == 4
    assert read_loss_csv(os.path.join(output, "logs", "loss.csv"))[-1][0] == 4

    images = node_map["DSDSampler"]().sample(handle, reference_image, prompt=CAPTION, seed=0, steps=2,
                                             guidance=3.5, image_guidance=1.0, text_guidance=1.0,
                                             panel_size=256, batch_size=1, lora_scale=1.0)["result"][0]
    assert images.shape == (1, 256, 256, 3) and torch.isfinite(images).all()

    plot = node_map["DSDPlotLoss"]().plot(loss, 400, 200)[0]
    assert plot.shape == (1, 200, 400, 3) and plot.min() < 0.5  # axes and curve drawn on white

    saved = node_map["DSDSaveTrainedModel"]().save(folder, "snapshot", False)[0]
    assert sorted(os.listdir(saved)) == ["pytorch_lora_weights.safetensors", "transformer"]
    # the DSD Model Loader lists and loads the trained and the saved folders
    choices = node_map["DSDModelLoader"].INPUT_TYPES()["required"]["model"][0]
    assert {"trained", "snapshot"} <= set(choices)
    loaded = node_map["DSDModelLoader"]().load("snapshot", DEFAULT_BASE_NAME, "float32", "full", "exact", False)[0]
    again = node_map["DSDSampler"]().sample(loaded, reference_image, prompt=CAPTION, seed=0, steps=2,
                                            guidance=3.5, image_guidance=1.0, text_guidance=1.0,
                                            panel_size=256, batch_size=1, lora_scale=1.0)["result"][0]
    torch.testing.assert_close(again, images, rtol=1e-4, atol=1e-4)


def test_dataset_node_names_bad_items(comfy, tmp_path):
    with open(os.path.join(comfy["data"], "metadata.jsonl"), "a", encoding="utf-8") as fh:
        fh.write('{"reference": "ref_0.png", "target": "nope.png", "caption": "x"}\n')
    from dsd_core.errors import InputError

    with pytest.raises(InputError, match="line 5 .*nope.png"):
        nodes.NODE_CLASS_MAPPINGS["DSDTrainingDataset"]().load(comfy["data"], "reference", "target", "caption", PANEL)
