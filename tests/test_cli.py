"""The command line end to end on a tiny model written to disk, the tiny model builder, and the README quickstart."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from conftest import FIXTURE, ROOT

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path_factory):
    """Subprocesses see an empty Hugging Face cache, so a repo id can never resolve to a real download."""
    ENV["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("hub-cache"))


def cli(*args, cwd=None, check=True):
    res = subprocess.run([sys.executable, "-m", "dsd_core", *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                         timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_help_and_memory_need_no_heavy_imports():
    """`--help` and `memory` build every command's parser and the estimates without torch / diffusers (fast start;
    benchmarks/bench_cli_startup.py times it)."""
    code = ("import sys; from dsd_core.cli import build_parser, main; build_parser().format_help(); "
            "assert main(['memory']) == 0; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules]; "
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| 12gb |" in res.stdout


def test_generate_help_speaks_cli_not_python():
    res = cli("generate", "--help")
    assert "gguf_file" not in res.stdout and "--gguf FILE" in res.stdout and "8gb:" in res.stdout


def test_tiny_model_is_complete_and_deterministic(tiny_model, tmp_path):
    from dsd_core.tiny import write_tiny_model

    again = write_tiny_model(str(tmp_path / "again"))
    for root, _, files in os.walk(tiny_model["base"] + "/.."):
        for f in files:
            p = os.path.join(root, f)
            q = os.path.join(tmp_path / "again", os.path.relpath(p, os.path.dirname(tiny_model["base"])))
            assert sha(p) == sha(q), p
    assert os.path.isfile(again["lora"]) and os.path.isfile(os.path.join(again["transformer"], "config.json"))
    with pytest.raises(FileExistsError):
        write_tiny_model(str(tmp_path / "again"))


def test_generate_end_to_end_and_reproducible(tiny_model, tmp_path):
    args = ["generate", "--image", tiny_model["reference"], "--prompt", "a cat on a red chair",
            "--base", tiny_model["base"], "--model", tiny_model["model"], "--steps", "3", "--seed", "7",
            "--image-guidance", "1.5", "--device", "cpu", "--quiet"]
    res = cli(*args, "--out", str(tmp_path / "a.png"), "--num-images", "2", "--save-panel", "--save-reference")
    assert "saved" in res.stdout and "seed 7" in res.stdout and "seed 8" in res.stdout
    # --quiet: only the saved paths; no progress bars, no other library's warnings
    assert all(line.startswith("saved ") for line in res.stdout.splitlines()) and res.stderr == "", res.stderr
    a = PIL.Image.open(tmp_path / "a.png")
    assert a.size == (512, 512)
    meta = json.loads(a.text["dsd"])
    assert meta["seed"] == 7 and meta["image_guidance"] == 1.5 and meta["prompt"] == "a cat on a red chair"
    assert PIL.Image.open(tmp_path / "a_1.png").size == (512, 512)
    assert PIL.Image.open(tmp_path / "a_panel.png").size == (1024, 512)
    assert PIL.Image.open(tmp_path / "a_reference.png").size == (512, 512)
    # the same command again gives the same pixels
    cli(*args, "--out", str(tmp_path / "b.png"), "--num-images", "2")
    for a_name, b_name in (("a.png", "b.png"), ("a_1.png", "b_1.png")):
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / a_name)), np.asarray(PIL.Image.open(tmp_path / b_name)))
    # image 2 of the batch (seed 8) is a single run with seed 8, up to the rounding of batched kernels
    single = [a if a != "7" else "8" for a in args]
    cli(*single, "--out", str(tmp_path / "c.png"))
    d = np.abs(np.asarray(PIL.Image.open(tmp_path / "a_1.png"), np.int16) - np.asarray(PIL.Image.open(tmp_path / "c.png"), np.int16))
    assert d.max() <= 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_generate_matches_the_python_api(tmp_path):
    """CLI and API agree pixel for pixel (fixture model, float32)."""
    from dsd_core.image import load_image, prepare_reference
    from dsd_core.loading import load_pipeline

    image = os.path.join(FIXTURE, "images", "portrait_480x640.png")
    cli("generate", "--image", image, "--prompt", "this character", "--base", os.path.join(FIXTURE, "base"),
        "--model", os.path.join(FIXTURE, "dsd"), "--steps", "2", "--seed", "3", "--dtype", "float32",
        "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli.png"))
    pipe = load_pipeline(os.path.join(FIXTURE, "base"), os.path.join(FIXTURE, "dsd"), dtype="float32", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prepare_reference(load_image(image)), "this character", num_inference_steps=2, seed=3)
    assert list(out.images[0].getdata()) == list(PIL.Image.open(tmp_path / "cli.png").getdata())


@pytest.mark.parametrize("extra,needle", [
    (["--base", "/nonexistent/flux"], "base /nonexistent/flux does not exist"),
    (["--model", "primecai/dsd_model", "--offline"], "cannot get the DSD weights from primecai/dsd_model"),
    (["--transformer", os.path.join(FIXTURE, "base", "transformer")], "plain FLUX transformer"),
    (["--base", os.path.join(FIXTURE, "dsd")], "is not a diffusers FLUX.1-dev folder"),
    (["--height", "500"], "multiple of 16"),
])
def test_generate_errors_are_one_line(tmp_path, extra, needle):
    args = ["generate", "--image", os.path.join(FIXTURE, "images", "square_512.png"), "--prompt", "x",
            "--out", str(tmp_path / "x.png"), "--base", os.path.join(FIXTURE, "base"),
            "--model", os.path.join(FIXTURE, "dsd"), "--steps", "1", "--device", "cpu", "--quiet", *extra]
    res = cli(*args, check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()  # other libraries may log warnings before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_missing_image_is_one_line(tmp_path):
    res = cli("generate", "--image", str(tmp_path / "none.png"), "--prompt", "x", "--out", str(tmp_path / "o.png"),
              check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


# README's quickstart and test blocks are run as written by tests/test_readme.py (in a hyphenated clone).


def test_generate_with_prompt_enhancement(tiny_model, tmp_path):
    """Off by default; without a key the run goes on and says why; with a key (fake server) the prompt is used."""
    from fake_gemini import FakeGemini

    args = ["generate", "--image", tiny_model["reference"], "--prompt", "this fox on a beach", "--base",
            tiny_model["base"], "--model", tiny_model["model"], "--steps", "1", "--seed", "0", "--height", "256",
            "--width", "512", "--device", "cpu", "--quiet", "--enhance-prompt", "gemini"]
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DSD_GEMINI_KEY_FILE", "GOOGLE_GENAI_USE_VERTEXAI"):
        ENV.pop(var, None)
    ENV["DSD_CACHE_DIR"] = str(tmp_path / "cache")
    res = cli(*args, "--out", str(tmp_path / "nokey.png"))
    assert "prompt not enhanced" in res.stderr and "key" in res.stderr.lower()
    assert res.stderr.count("fell back") == 1, res.stderr  # said once, not by the logger and the CLI
    assert json.loads(PIL.Image.open(tmp_path / "nokey.png").text["dsd"])["prompt"] == "this fox on a beach"

    secret = "AIzaTEST-cli-secret-0123456789"
    with FakeGemini("success") as fake:
        ENV.update(GEMINI_API_KEY=secret, DSD_GEMINI_BASE_URL=fake.base_url)
        try:
            res = cli(*args, "--out", str(tmp_path / "enhanced.png"))
        finally:
            for var in ("GEMINI_API_KEY", "DSD_GEMINI_BASE_URL", "DSD_CACHE_DIR"):
                ENV.pop(var, None)
        assert fake.request_count == 2
    assert "enhanced prompt (gemini)" in res.stdout
    meta = json.loads(PIL.Image.open(tmp_path / "enhanced.png").text["dsd"])
    assert meta["user_prompt"] == "this fox on a beach" and "fox" in meta["prompt"] and meta["prompt"] != meta["user_prompt"]
    assert secret.encode() not in (tmp_path / "enhanced.png").read_bytes()
    assert secret not in res.stdout + res.stderr


def test_generate_from_single_files(tmp_path):
    """tiny-model --comfy-files, then generate from the single files alone (what a ComfyUI user has)."""
    cli("tiny-model", str(tmp_path / "t"), "--comfy-files")
    m = tmp_path / "t" / "comfyui_models"
    args = ["generate", "--image", str(tmp_path / "t" / "reference.png"), "--prompt", "a cat", "--steps", "1",
            "--height", "256", "--width", "512", "--seed", "1", "--device", "cpu", "--quiet",
            "--transformer-file", str(m / "diffusion_models" / "dsd_transformer.safetensors"),
            "--clip-l", str(m / "text_encoders" / "clip_l.safetensors"),
            "--t5xxl", str(m / "text_encoders" / "t5xxl_fp16.safetensors"), "--vae-file", str(m / "vae" / "ae.safetensors"),
            "--lora", str(m / "loras" / "dsd_lora.safetensors")]
    cli(*args, "--tokenizers", str(m / "dsd" / "tokenizers"), "--out", str(tmp_path / "o.png"))
    assert PIL.Image.open(tmp_path / "o.png").size == (256, 256)
    res = cli(*args, "--tokenizers", str(tmp_path), "--out", str(tmp_path / "x.png"), check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    res = cli(*args[:-2], "--out", str(tmp_path / "y.png"), "--clip-l", str(m / "vae" / "ae.safetensors"), check=False)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_memory_table_and_memory_flags(tiny_model, tmp_path):
    res = cli("memory")
    for preset in ("full", "24gb", "16gb", "12gb", "8gb", "lowest"):
        assert f"| {preset} |" in res.stdout
    cli("generate", "--image", tiny_model["reference"], "--prompt", "a cat", "--base", tiny_model["base"],
        "--model", tiny_model["model"], "--steps", "2", "--seed", "0", "--height", "256", "--width", "512",
        "--device", "cpu", "--quiet", "--memory", "16gb", "--fast", "--out", str(tmp_path / "m.png"))
    meta = json.loads(PIL.Image.open(tmp_path / "m.png").text["dsd"])
    assert meta["memory"].startswith("16gb: transformer fp8") and meta["fast"] is True
    res = cli("generate", "--image", tiny_model["reference"], "--prompt", "a cat", "--base", tiny_model["base"],
              "--model", tiny_model["model"], "--memory", "8gb", "--device", "cpu", "--out", str(tmp_path / "n.png"),
              check=False)
    assert res.returncode == 2 and "error:" in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
