"""``tiny-model DIR --comfyui MODELS_DIR``: the tiny set laid out in a ComfyUI models folder in one step."""

from __future__ import annotations

import os

import pytest

from dsd_core.cli import main
from dsd_core.errors import InputError
from dsd_core.files import file_mode
from dsd_core.tiny import write_tiny_comfy_models


def test_tiny_model_writes_a_comfyui_models_folder(tmp_path, capsys):
    comfy = tmp_path / "ComfyUI"
    (comfy / "input").mkdir(parents=True)
    models = comfy / "models"
    assert main(["tiny-model", str(tmp_path / "tiny"), "--comfyui", str(models)]) == 0
    out = capsys.readouterr().out
    assert str(models / "dsd" / "dsd_model") in out
    expected = ["dsd/dsd_model/transformer/config.json", "dsd/dsd_model/transformer/diffusion_pytorch_model.safetensors",
                "dsd/dsd_model/pytorch_lora_weights.safetensors", "diffusers/FLUX.1-dev/model_index.json",
                "diffusers/FLUX.1-dev/vae/diffusion_pytorch_model.safetensors",
                "diffusers/FLUX.1-dev/text_encoder_2/config.json", "diffusers/FLUX.1-dev/tokenizer/tokenizer_config.json",
                "diffusion_models/dsd_transformer.safetensors", "loras/dsd_lora.safetensors",
                "text_encoders/clip_l.safetensors", "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors",
                "dsd/tokenizers/clip/tokenizer_config.json", "dsd/tokenizers/t5/tokenizer_config.json"]
    missing = [p for p in expected if not (models / p).is_file()]
    assert not missing, missing
    assert (comfy / "input" / "dsd_reference.png").is_file()  # the workflows' input image
    assert not [p for p in os.listdir(models) if p.startswith(".tiny-")]  # no temp folder left
    for p in expected:
        assert os.stat(models / p).st_mode & 0o777 == file_mode(), p
    # the single files hold the same model as the folders (the engine tier runs every workflow from this layout)
    same = (models / "loras" / "dsd_lora.safetensors").read_bytes()
    assert same == (models / "dsd" / "dsd_model" / "pytorch_lora_weights.safetensors").read_bytes()


def test_tiny_model_never_overwrites_a_models_folder(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "dsd" / "dsd_model").mkdir(parents=True)
    (models / "dsd" / "dsd_model" / "real.safetensors").write_bytes(b"real weights")
    assert main(["tiny-model", str(tmp_path / "tiny"), "--comfyui", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "never overwrites models" in err and "dsd_model" in err
    assert not (tmp_path / "tiny").exists()  # refused before writing anything
    assert (models / "dsd" / "dsd_model" / "real.safetensors").read_bytes() == b"real weights"
    assert not (models / "diffusers").exists()
    with pytest.raises(InputError, match="point --comfyui at another models folder"):
        write_tiny_comfy_models(str(models))
