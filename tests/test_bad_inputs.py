"""The bad-input matrix (issue #9): every bad input gets a clear, early answer through the CLI, the Python API and
the node classes; NaN never becomes an image; nothing unsafe loads.

Each case asserts its class of outcome: a package error (:class:`dsd_core.errors.DSDError`) whose message is checked,
raised *before any weights load* (the loaders are replaced by ones that fail the test), or acceptance with a sane
image. Most cases run in-process; a representative few run the CLI as a subprocess (one ``error:`` line, no
traceback unless ``-v``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT
from dsd_core.errors import (ConcurrentUseError, DSDError, InputError, ModelFormatError, ModelNotFoundError,
                             NonFiniteError)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    """``broken(kind)``: a copy of the tiny model set with one thing broken (made once per kind)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")
    src = os.path.dirname(tiny_model["base"])

    def lora_rewrite(d, fn):
        path = d / "dsd" / "pytorch_lora_weights.safetensors"
        save_file(fn(load_file(str(path))), str(path))

    def truncate(path, keep=0.5):
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    transformer_file = ("dsd", "transformer", "diffusion_pytorch_model.safetensors")
    mutations = {
        "truncated_transformer": lambda d: truncate(d.joinpath(*transformer_file)),
        "random_transformer": lambda d: d.joinpath(*transformer_file).write_bytes(os.urandom(4096)),
        "config_mismatch": lambda d: _edit_json(d / "dsd" / "transformer" / "config.json", joint_attention_dim=48),
        "plain_flux": lambda d: (shutil.rmtree(d / "dsd" / "transformer"),
                                 shutil.copytree(d / "base" / "transformer", d / "dsd" / "transformer")),
        "lora_wrong_keys": lambda d: lora_rewrite(d, lambda sd: {k.replace("transformer_blocks", "unet_blocks"): v
                                                                 for k, v in sd.items()}),
        "lora_wrong_shapes": lambda d: lora_rewrite(d, lambda sd: {
            k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in sd.items()}),
        "lora_truncated": lambda d: truncate(d / "dsd" / "pytorch_lora_weights.safetensors"),
        "lora_not_lora": lambda d: shutil.copy(d / "base" / "vae" / "diffusion_pytorch_model.safetensors",
                                               d / "dsd" / "pytorch_lora_weights.safetensors"),
        "empty_tokenizer": lambda d: [os.remove(p) for p in (d / "base" / "tokenizer_2").iterdir()],
        "pickled_vae": lambda d: _pickle_vae(d / "base" / "vae"),
        "vae_config_mismatch": lambda d: _edit_json(d / "base" / "vae" / "config.json", latent_channels=8),
    }

    def make(kind: str) -> dict:
        dst = root / kind
        if not dst.exists():
            shutil.copytree(src, dst, symlinks=True)
            mutations[kind](dst)
        return {"base": str(dst / "base"), "model": str(dst / "dsd"), "reference": str(dst / "reference.png"),
                "lora": str(dst / "dsd" / "pytorch_lora_weights.safetensors")}

    return make


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _pickle_vae(folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    torch.save(sd, folder / "diffusion_pytorch_model.bin")  # a pickle on disk, as old downloads have
    os.remove(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture
def no_weights(monkeypatch):
    """Loaders that fail the test: every case using this must be answered before any weights load."""
    from dsd_core import single_file, sources
    from dsd_core.pipeline import DSDPipeline
    from dsd_core.transformer import DSDTransformer2DModel

    calls = []

    def banned(name):
        def load(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was loaded before the bad input was reported")

        return load

    monkeypatch.setattr(DSDTransformer2DModel, "from_pretrained", classmethod(lambda cls, *a, **k: banned(
        "transformer")()))
    monkeypatch.setattr(DSDPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: banned("base")()))
    monkeypatch.setattr(DSDPipeline, "load_dsd_lora", lambda self, *a, **k: banned("lora")())
    monkeypatch.setattr(single_file, "load_components_from_files", banned("single files"))
    for name in ("_base_components", "_folder_transformer", "_file_transformer"):  # the sources' loaders
        monkeypatch.setattr(sources, name, banned(name))
    return calls


def run_cli(args, capsys):
    from dsd_core.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def generate_args(tiny_model, tmp_path, *extra, out="out.png", model=None):
    model = model or tiny_model
    argv = ["generate", "--image", model.get("reference", tiny_model["reference"]), "--prompt", "a cat",
            "--base", model["base"], "--model", model["model"], "--steps", "1", "--seed", "0", "--height", "64",
            "--width", "128", "--quiet", "--offline", "--device", "cpu", "--out", str(tmp_path / out)]
    return argv + list(extra)


def assert_one_error_line(rc, err, match):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]
    return lines[0]


def sane(image: PIL.Image.Image, size=(64, 64)) -> None:
    arr = np.asarray(image, dtype=np.float32)
    assert image.size == size and np.isfinite(arr).all()
    assert arr.std() > 1.0, "a flat (black/white) image is not a sane result"


# ---------------------------------------------------------------------------------------------- CLI: arguments
CLI_ARGUMENT_CASES = [
    (("--guidance", "nan"), "--guidance must be a finite number"),
    (("--guidance", "inf"), "--guidance must be a finite number"),
    (("--image-guidance", "inf"), "--image-guidance must be a finite number"),
    (("--image-guidance", "nan"), "--image-guidance must be a finite number"),
    (("--text-guidance", "nan"), "--text-guidance must be a finite number"),
    (("--lora-scale", "nan"), "--lora-scale must be a finite number"),
    (("--guidance", "-1"), "--guidance must be at least 0"),
    (("--steps", "0"), "--steps must be at least 1"),
    (("--num-images", "0"), "--num-images must be at least 1"),
    (("--true-guidance-start", "-1"), "--true-guidance-start must be at least 0"),
    (("--height", "100"), "canvas 128x100 is not valid"),
    (("--device", "cuda"), "CUDA is not available"),
]


@pytest.mark.parametrize("extra,match", CLI_ARGUMENT_CASES, ids=[" ".join(c[0]) for c in CLI_ARGUMENT_CASES])
def test_cli_argument_errors_come_before_loading(extra, match, tiny_model, tmp_path, capsys, no_weights):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run_cli(generate_args(tiny_model, tmp_path, *extra), capsys)
    assert_one_error_line(rc, err, match)
    assert no_weights == [] and not os.path.exists(tmp_path / "out.png")


def test_cli_non_integer_seed_is_an_argparse_error(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(generate_args(tiny_model, tmp_path, "--seed", "abc"), capsys)
    assert e.value.code == 2 and "invalid int value: 'abc'" in capsys.readouterr().err


def test_cli_output_path_errors_come_before_loading(tiny_model, tmp_path, capsys, no_weights, monkeypatch):
    cases = [
        ("out.jpg", "images are saved as PNG"),  # PNG bytes must not land under a .jpg name
        ("", "is a folder"),  # --out DIR must not silently write DIR.png
    ]
    for out, match in cases:
        argv = generate_args(tiny_model, tmp_path)
        argv[-1] = str(tmp_path / out) if out else str(tmp_path)
        assert_one_error_line(*run_cli(argv, capsys)[::2], match)
    argv = generate_args(tiny_model, tmp_path)
    argv[-1] = "/proc/dsd-no-such/out.png"  # not writable, even for root
    assert_one_error_line(*run_cli(argv, capsys)[::2], "is not writable")
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 100, 100))
    assert_one_error_line(*run_cli(generate_args(tiny_model, tmp_path), capsys)[::2], "free some space")
    assert no_weights == []


def test_cli_huge_canvas_is_refused_up_front(tiny_model, tmp_path, capsys, no_weights, monkeypatch):
    from dsd_core import validation

    monkeypatch.setattr(validation, "available_memory", lambda device: 4 * 2**30)
    argv = generate_args(tiny_model, tmp_path, "--height", "8192", "--width", "16384")
    line = assert_one_error_line(*run_cli(argv, capsys)[::2], "canvas needs at least")
    assert "4.0 GB" in line and "smaller canvas" in line and no_weights == []
    assert validation.canvas_memory(512, 1024, 1, (128, 256), 2) < 2 * 2**30  # the default size is never refused


def _bad_images(tmp_path):
    png = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (200, 10, 10)).save(png, "PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "random.png").write_bytes(os.urandom(2048))
    (tmp_path / "folder.png").mkdir()
    return [(str(tmp_path / "truncated.png"), "damaged or incomplete"),
            (str(tmp_path / "random.png"), "is not an image"),
            (str(tmp_path / "folder.png"), "is a folder"),
            (str(tmp_path / "missing.png"), "does not exist")]


def test_cli_bad_reference_images(tiny_model, tmp_path, capsys, no_weights, monkeypatch):
    for path, match in _bad_images(tmp_path):
        argv = generate_args(tiny_model, tmp_path)
        argv[argv.index("--image") + 1] = path
        assert_one_error_line(*run_cli(argv, capsys)[::2], match)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # the reference is now a "decompression bomb"
    assert_one_error_line(*run_cli(generate_args(tiny_model, tmp_path), capsys)[::2], "too large to open safely")
    assert no_weights == []


# ---------------------------------------------------------------------------------------------- model files
MODEL_FILE_CASES = [
    ("truncated_transformer", "is not a valid safetensors file"),
    ("random_transformer", "is not a valid safetensors file"),
    ("config_mismatch", "do not belong together"),
    ("plain_flux", "plain FLUX transformer"),
    ("lora_wrong_keys", "modules the transformer does not have"),
    ("lora_wrong_shapes", "made for a model of another size"),
    ("lora_truncated", "is not a valid safetensors file"),
    ("lora_not_lora", "holds no LoRA weights"),
    ("empty_tokenizer", "holds no usable tokenizer"),
    ("pickled_vae", "holds only pickle weights"),
    ("vae_config_mismatch", "do not belong together"),
]


@pytest.mark.parametrize("kind,match", MODEL_FILE_CASES, ids=[c[0] for c in MODEL_FILE_CASES])
def test_cli_broken_model_files_are_one_line_before_loading(kind, match, broken, tiny_model, tmp_path, capsys,
                                                             no_weights):
    rc, _, err = run_cli(generate_args(tiny_model, tmp_path, model=broken(kind)), capsys)
    line = assert_one_error_line(rc, err, match)
    assert "--init-condition-embedder" not in line and "low_cpu_mem_usage" not in line
    assert no_weights == []


@pytest.mark.parametrize("kind", ["lora_wrong_shapes", "config_mismatch", "pickled_vae"])
def test_api_broken_model_files_raise_typed_errors_before_loading(kind, broken, no_weights):
    from dsd_core.loading import load_pipeline

    m = broken(kind)
    with pytest.raises(ModelFormatError):
        load_pipeline(base=m["base"], model=m["model"], dtype="float32", device="cpu", local_files_only=True)
    assert no_weights == []


def test_paths_of_the_wrong_kind_say_so(tiny_model, tmp_path, capsys, no_weights):
    from dsd_core.loading import load_pipeline

    lora = tiny_model["lora"]
    for flag in ("--base", "--model"):
        argv = generate_args(tiny_model, tmp_path)
        argv[argv.index(flag) + 1] = lora
        line = assert_one_error_line(*run_cli(argv, capsys)[::2], "is a file")
        assert "does not exist" not in line
    with pytest.raises(ModelFormatError, match="is a file"):
        load_pipeline(base=lora, model=tiny_model["model"], device="cpu", local_files_only=True)
    with pytest.raises(InputError, match="CUDA is not available") if not torch.cuda.is_available() else \
            pytest.raises(ModelFormatError):
        load_pipeline(base=lora if torch.cuda.is_available() else tiny_model["base"], model=tiny_model["model"],
                      device="cuda", local_files_only=True)
    assert no_weights == []


def test_base_loads_safetensors_only(tiny_pipe, tiny_model, tmp_path, monkeypatch):
    """Even past the header check (e.g. a .bin next to the safetensors), diffusers is told to read safetensors."""
    from diffusers import FluxPipeline

    seen = {}
    real = FluxPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", classmethod(spy))
    from dsd_core.loading import load_pipeline

    load_pipeline(base=tiny_model["base"], model=tiny_model["model"], dtype="float32", device="cpu",
                  local_files_only=True)
    assert seen.get("use_safetensors") is True


def test_mismatched_lora_through_the_api(tiny_pipe, broken):
    for kind, match in (("lora_wrong_keys", "modules the transformer does not have"),
                        ("lora_wrong_shapes", "another size"), ("lora_not_lora", "holds no LoRA weights")):
        with pytest.raises(ModelFormatError, match=match):
            tiny_pipe.load_dsd_lora(broken(kind)["lora"], adapter_name=f"bad_{kind}")
    assert set(tiny_pipe.transformer.peft_config) == {"dsd"}  # nothing half-loaded


# ---------------------------------------------------------------------------------------------- the Python API
API_CASES = [
    (dict(prompt=None), "prompt must be a string"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(num_inference_steps=0), "at least 1"),
    (dict(guidance_scale=NAN), "guidance_scale must be a finite number"),
    (dict(image_guidance_scale=NAN), "image_guidance_scale must be a finite number"),
    (dict(image_guidance_scale=INF), "image_guidance_scale must be a finite number"),
    (dict(lora_scale=NAN), "lora_scale must be a finite number"),
    (dict(true_guidance_start_step=-1), "at least 0"),
    (dict(num_images_per_prompt=0), "at least 1"),
    (dict(height=100), "is not valid"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(image="cat.png"), "image must be a PIL image or a tensor"),
    (dict(image=torch.full((1, 3, 64, 64), NAN)), "NaN or infinite"),
]


@pytest.mark.parametrize("kwargs,match", API_CASES, ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values())))[:20]
                                                        for c in API_CASES])
def test_api_bad_arguments_raise_typed_errors(kwargs, match, tiny_pipe, reference_image, monkeypatch):
    monkeypatch.setattr(type(tiny_pipe.transformer), "forward", lambda *a, **k: pytest.fail("the model ran"))
    call = dict(image=reference_image.resize((64, 64)), prompt="a cat", height=64, width=128,
                num_inference_steps=1, seed=0)
    call.update(kwargs)
    with pytest.raises(InputError, match=match):
        tiny_pipe(**call)


def test_api_helpers_raise_typed_errors(reference_image):
    from dsd_core.image import pil_to_tensor, prepare_reference, tensor_to_pil

    with pytest.raises(InputError, match="height must be at least 1"):
        prepare_reference(reference_image, 0, 0)
    with pytest.raises(InputError, match="batch is empty"):
        tensor_to_pil(torch.zeros(0, 64, 64, 3))
    with pytest.raises(InputError, match="NaN or infinite"):
        tensor_to_pil(torch.full((1, 8, 8, 3), NAN))
    with pytest.raises(InputError, match="no images"):
        pil_to_tensor([])


ACCEPTED = [  # edge values grouped to keep the number of (slow on a shared CPU) generations small
    dict(guidance_scale=0.0, prompt=""),
    dict(image_guidance_scale=1.5, true_guidance_start_step=0, seed=2**64 - 1),
    dict(num_inference_steps=np.int64(1), lora_scale=0.0),
]


@pytest.mark.parametrize("kwargs", ACCEPTED, ids=[",".join(c) for c in ACCEPTED])
def test_api_edge_values_are_accepted_with_a_sane_image(kwargs, tiny_pipe, reference_image):
    call = dict(image=reference_image.resize((64, 64)), prompt="a cat", height=64, width=128, num_inference_steps=1,
                seed=0)
    call.update(kwargs)
    out = tiny_pipe(**call)
    sane(out.images[0])


@pytest.mark.parametrize("stage,target", [("velocity", "transformer"), ("decoded", "vae.decoder"),
                                          ("condition", "vae.encoder")])
def test_non_finite_values_in_the_run_stop_it_with_the_cause(stage, target, tiny_pipe, reference_image):
    module = tiny_pipe
    for part in target.split("."):
        module = getattr(module, part)

    def poison(mod, args, output):
        if isinstance(output, tuple):
            return (output[0] * NAN,) + tuple(output[1:])
        return output * NAN

    handle = module.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match=f"the {stage} .*became NaN.*Likely cause") as e:
            tiny_pipe(reference_image.resize((64, 64)), "a cat", height=64, width=128, num_inference_steps=1, seed=0)
    finally:
        handle.remove()
    assert "bfloat16 or float32" in str(e.value)


# ---------------------------------------------------------------------------------------------- nodes
def _handle(pipe=None):
    from dsd_core.model_store import LazyPipeline, PipelineSpec
    from dsd_core.sources import FolderSource

    def loader(spec):
        if pipe is None:
            raise AssertionError("the model was loaded before the bad input was reported")
        return pipe

    return LazyPipeline(PipelineSpec(source=FolderSource(base="b", model="m"), device="cpu"), loader=loader)


def _sample(handle, image, **kw):
    import nodes

    args = dict(prompt="a cat", seed=3, steps=1, guidance=3.5, image_guidance=1.0, text_guidance=1.0,
                panel_size=64, batch_size=1, lora_scale=1.0)
    args.update(kw)
    return nodes.NODE_CLASS_MAPPINGS["DSDSampler"]().sample(handle, image, **args)["result"]


NODE_CASES = [
    (dict(guidance=NAN), "guidance must be a finite number"),
    (dict(image_guidance=INF), "image_guidance must be a finite number"),
    (dict(lora_scale=NAN), "lora_scale must be a finite number"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(image=torch.zeros(0, 64, 64, 3)), "batch is empty"),
    (dict(image=torch.full((1, 64, 64, 3), NAN)), "NaN or infinite"),
]


@pytest.mark.parametrize("kwargs,match", NODE_CASES, ids=[next(iter(c[0])) for c in NODE_CASES])
def test_sampler_node_bad_inputs(kwargs, match):
    image = kwargs.pop("image", torch.rand(1, 64, 64, 3))
    with pytest.raises(InputError, match=match):
        _sample(_handle(), image, **kwargs)


def test_sampler_node_accepts_an_odd_reference_with_a_sane_image(tiny_pipe):
    from dsd_core.image import pil_to_tensor, to_rgb

    rgba = PIL.Image.new("RGBA", (80, 50), (0, 0, 0, 0))
    rgba.paste((250, 20, 20, 255), (10, 10, 40, 40))
    images, references, prompt, notes = _sample(_handle(tiny_pipe), pil_to_tensor(to_rgb(rgba)))
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all() and images.std() > 0
    assert prompt == "a cat"


def test_image_prep_node_empty_batch():
    import nodes

    with pytest.raises(InputError, match="batch is empty"):
        nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"]().prepare(torch.zeros(0, 8, 8, 3), "center_crop", "bicubic", 64,
                                                            "white")


@pytest.mark.parametrize("name", ["../dsd_model", "../../etc", "/etc", "a/../../b", "C:/models", "..\\x"])
def test_node_model_names_cannot_leave_the_model_folders(name, tmp_path, monkeypatch, no_weights):
    import nodes
    from nodes import _comfy

    (tmp_path / "dsd").mkdir()
    (tmp_path / "dsd_model" / "transformer").mkdir(parents=True)  # what ../dsd_model would reach
    monkeypatch.setattr(_comfy, "folder_roots", lambda folder: [str(tmp_path / folder)])
    loader = nodes.NODE_CLASS_MAPPINGS["DSDModelLoader"]()
    with pytest.raises(DSDError, match="outside its model folder"):  # reported with any other loader problem
        loader.load(model=name, base="FLUX.1-dev", dtype="float32", memory="full", speed="exact",
                    download_missing=False)
    files = nodes.NODE_CLASS_MAPPINGS["DSDFilesLoader"]()
    with pytest.raises(InputError, match="outside its model folder"):
        files.load(transformer=name + "/x.safetensors", lora="l.safetensors", clip_l="c.safetensors",
                   t5xxl="t.safetensors", vae="v.safetensors", dtype="float32", memory="full", speed="exact")
    assert no_weights == []


def test_node_model_names_inside_the_folders_still_work(tmp_path, monkeypatch):
    from dsd_core.model_store import find_folder
    from nodes import _comfy

    (tmp_path / "models" / "sub" / "m").mkdir(parents=True)
    (tmp_path / "models" / "f.safetensors").write_bytes(b"x")
    monkeypatch.setattr(_comfy, "folder_roots", lambda folder: [str(tmp_path / "models")])
    assert find_folder("sub/m", [str(tmp_path / "models")]) == str(tmp_path / "models" / "sub" / "m")
    assert find_folder("sub/../sub/m", [str(tmp_path / "models")]) == str(tmp_path / "models" / "sub" / "m")
    assert _comfy.full_path("loras", "f.safetensors") == str(tmp_path / "models" / "f.safetensors")


def test_node_errors_are_translated_to_one_line(tiny_pipe, monkeypatch):
    """A low-level failure inside a node (here: memory) reaches ComfyUI as the package's one-line message."""
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(tiny_pipe, "decode", oom)
    with pytest.raises(DSDError, match="ran out of memory.*smaller canvas") as e:
        _sample(_handle(tiny_pipe), torch.rand(1, 64, 64, 3))
    assert isinstance(e.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------- concurrency
def test_two_threads_share_one_pipeline_safely(tiny_pipe, reference_image):
    ref = reference_image.resize((64, 64))
    call = dict(prompt="a cat", height=64, width=128, num_inference_steps=1, output_type="np")
    expected = {s: tiny_pipe(ref, seed=s, **call).images for s in (1, 2)}
    results, errors = {}, []
    start = threading.Barrier(2)

    def worker(seed):
        try:
            start.wait()
            results[seed] = tiny_pipe(ref, seed=seed, **call).images
        except Exception as e:  # noqa: BLE001 -- collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and set(results) == {1, 2}
    for s in (1, 2):
        np.testing.assert_array_equal(results[s], expected[s])


def test_a_call_from_inside_a_call_is_refused(tiny_pipe, reference_image):
    ref = reference_image.resize((64, 64))

    def reenter(step, total, latents):
        tiny_pipe(ref, "again", height=64, width=128, num_inference_steps=1, seed=0)

    with pytest.raises(ConcurrentUseError, match="one generation at a time"):
        tiny_pipe(ref, "a cat", height=64, width=128, num_inference_steps=1, seed=0, progress_callback=reenter)
    out = tiny_pipe(ref, "a cat", height=64, width=128, num_inference_steps=1, seed=0, output_type="latent")
    assert torch.isfinite(out.images).all()  # the lock was released: the pipeline is still usable


# ---------------------------------------------------------------------------------------------- CLI subprocess
def _subprocess(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "dsd_core", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_process_prints_one_error_line(tiny_model, broken, tmp_path):
    """The representative subprocess case: a real process exits 2 with one `error:` line and no traceback."""
    res = _subprocess(generate_args(tiny_model, tmp_path, model=broken("lora_wrong_shapes")))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "another size" in last
    assert not os.path.exists(tmp_path / "out.png")


def test_cli_traceback_only_with_v(tiny_model, broken, tmp_path, capsys, no_weights):
    argv = generate_args(tiny_model, tmp_path, model=broken("lora_wrong_keys"))
    rc, _, err = run_cli(["-v"] + argv, capsys)
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert_one_error_line(*run_cli(argv, capsys)[::2], "modules the transformer does not have")


def test_error_report_translates_common_low_level_errors(capsys):
    import errno

    from dsd_core.error_report import report, translate

    assert "disk is full" in str(translate(OSError(errno.ENOSPC, "No space left on device", "/x/out.png")))
    assert "Read-only" in str(translate(OSError(errno.EROFS, "Read-only file system", "/x")))
    assert isinstance(translate(RuntimeError("size mismatch for x.weight: copying a param with shape")),
                      ModelFormatError)
    assert translate(KeyError("nothing we know")) is None
    assert report(KeyError("boom"), verbose=False) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError") and "-v" in err and "Traceback" not in err
    assert isinstance(translate(ModelNotFoundError("x")), ModelNotFoundError)


def test_gemini_key_over_plain_http_is_warned(monkeypatch, caplog):
    from dsd_core.prompt import gemini

    assert gemini._plain_http("http://proxy.example:8080") and not gemini._plain_http("https://example.com")
    assert not gemini._plain_http("http://127.0.0.1:9999") and not gemini._plain_http("http://localhost:1")
    monkeypatch.setattr(gemini, "_sdk_available", lambda: None)  # stop right after the check: no client, no request
    enhancer = gemini.GeminiEnhancer(base_url="http://proxy.example:8080")
    with pytest.raises(gemini.EnhanceError):
        enhancer._open(gemini._Secret("k-123"), vertex=False)
    assert "travels unencrypted" in caplog.text and "k-123" not in caplog.text


def test_metadata_records_names_and_fingerprints_not_local_paths(tiny_model, broken):
    from dsd_core.provenance import fingerprint, model_record

    rec = model_record(tiny_model["model"])
    assert rec.startswith("dsd (sha256:") and os.path.dirname(tiny_model["model"]) not in rec
    assert model_record("primecai/dsd_model") == "primecai/dsd_model" and model_record(None) is None
    assert model_record(tiny_model["model"], full_paths=True) == os.path.abspath(tiny_model["model"])
    assert fingerprint(tiny_model["lora"]) != fingerprint(broken("lora_wrong_shapes")["lora"])  # content, not name
    assert fingerprint(tiny_model["model"]) == fingerprint(tiny_model["model"])


def test_cli_png_metadata_has_no_local_paths(tiny_model, tmp_path, capsys):
    rc, out, err = run_cli(generate_args(tiny_model, tmp_path), capsys)
    assert rc == 0, err
    image = PIL.Image.open(tmp_path / "out.png")
    sane(image)
    meta = json.loads(image.text["dsd"])
    assert meta["model"].startswith("dsd (sha256:") and meta["base"].startswith("base (sha256:")
    assert os.path.dirname(tiny_model["model"]) not in image.text["dsd"]


def test_temp_files_of_killed_runs_are_cleaned_up(tmp_path):
    """kill -9 between writing and renaming leaves a hidden temp file; the next save in that folder removes it."""
    from dsd_core.commands.generate import save_png
    from dsd_core.files import TEMP_PREFIX

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a process id that no longer exists
    stale = tmp_path / f"{TEMP_PREFIX}{proc.pid}-abc.png"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-live.png"  # a live writer's file is left alone
    mine.write_bytes(b"")
    os.utime(mine, (0, 0))
    save_png(PIL.Image.new("RGB", (4, 4)), str(tmp_path / "x.png"), {"k": 1})
    assert not stale.exists() and mine.exists() and (tmp_path / "x.png").exists()
