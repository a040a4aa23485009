"""Every memory mode against the exact output, on the tiny model set on the CPU.

Each mode runs the same generation (conftest.run: 64x128 canvas, 4 steps, true guidance on for steps 2-3, seed 1,
the tests' reference image) and is compared
with the exact output of the same compute dtype, in pixels in [0, 1]. The tolerances below are ~3x the differences
measured here; for scale, bf16 vs float32 exact differs by max 0.038 / mean 0.004 on the same run. A lossy mode must
also differ from exact by more than float noise, so a mode that silently did nothing would fail.

| mode                                   | compared with | max abs | mean abs | measured (max / mean) |
|----------------------------------------|---------------|---------|----------|-----------------------|
| offload model / group (hooks on CPU)   | fp32 exact    | 0       | 0        | 0 / 0                 |
| release_text_encoders                  | fp32 exact    | 0       | 0        | 0 / 0                 |
| fuse_lora (fp32)                       | fp32 exact    | 1e-4    | 1e-5     | <1e-5                 |
| fp8 transformer (fp32 compute)         | fp32 exact    | 0.02    | 0.002    | 0.0030 / 0.00029      |
| fp8 transformer (bf16 compute)         | bf16 exact    | 0.06    | 0.006    | 0.018 / 0.0019        |
| 12gb preset (fp8 + fused LoRA)         | fp32 exact    | 0.02    | 0.002    | 0.0034 / 0.00032      |
| fp8 text encoders                      | fp32 exact    | 0.02    | 0.002    | 0.0036 / 0.00035      |
| group offload + fp8                    | fp32 exact    | 0.02    | 0.002    | = fp8                 |
| int8 torchao (bf16)                    | bf16 exact    | 0.06    | 0.006    | 0.020 / 0.0020        |
| int4 torchao (bf16; int8 storage on CPU)| bf16 exact   | 0.2     | 0.025    | 0.066 / 0.0084        |
| GGUF Q8_0 (diffusers or BFL layout)    | fp32 exact    | 0.02    | 0.002    | 0.0041 / 0.00051      |
| GGUF Q4_0                              | fp32 exact    | 0.2     | 0.025    | 0.078 / 0.0082        |
| NF4 (bitsandbytes), int4 packed, sequential offload, streams | CUDA only: skipped here | | |  |
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

import conftest
from dsd_core.errors import DSDError, InputError, ModelFormatError, ModelNotFoundError
from dsd_core.loading import load_pipeline
from dsd_core.memory import MemoryConfig, PRESETS, apply_memory

CUDA = torch.cuda.is_available()
RUN = dict(num_inference_steps=4)  # over conftest.RUN: 64x128, seed 1, true guidance 2.0 from step 2

# mode -> (max abs, mean abs) against the exact output of the same dtype; see the module docstring.
TOLERANCES = {
    "fuse_lora": (1e-4, 1e-5),
    "fp8": (0.02, 0.002),
    "fp8_bf16": (0.06, 0.006),
    "12gb": (0.02, 0.002),
    "text_fp8": (0.02, 0.002),
    "int8": (0.06, 0.006),
    "int4": (0.2, 0.025),
    "gguf_Q8_0": (0.02, 0.002),
    "gguf_Q4_0": (0.2, 0.025),
}
NOISE = 1e-6  # a lossy mode must change the output by more than this


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_torchao = pytest.mark.skipif(not _has("torchao"), reason="torchao not installed (`pip install torchao`)")
needs_gguf = pytest.mark.skipif(not _has("gguf"), reason="gguf not installed (`pip install gguf`)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (mode only exists or only saves memory there)")


@pytest.fixture(scope="module")
def load(make_pipe):
    def _load(memory=None, **kw):
        return make_pipe(MemoryConfig.from_preset(memory) if isinstance(memory, str) else memory, **kw)

    return _load


@pytest.fixture(scope="module")
def run(reference_image):
    def _run(pipe, **kw):
        return conftest.run(pipe, reference_image, **{**RUN, **kw}).images.float().cpu()

    return _run


@pytest.fixture(scope="module")
def exact(load, run):
    return run(load())


@pytest.fixture(scope="module")
def exact_bf16(load, run):
    return run(load(dtype="bfloat16"))


def close(got, want, mode):
    max_tol, mean_tol = TOLERANCES[mode]
    diff = (got - want).abs()
    assert torch.isfinite(got).all()
    assert float(diff.max()) <= max_tol and float(diff.mean()) <= mean_tol, \
        f"{mode}: max {float(diff.max()):.4g} (tol {max_tol}), mean {float(diff.mean()):.4g} (tol {mean_tol})"
    return float(diff.max())


# ---------------------------------------------------------------------------------------------- exact modes
def test_full_preset_and_default_are_the_reference(load, run, exact):
    assert torch.equal(run(load("full")), exact)
    assert torch.equal(run(load(MemoryConfig())), exact)


@pytest.mark.parametrize("offload", ["model", "group"])
def test_offload_hooks_are_exact_on_cpu(load, run, exact, offload):
    pipe = load()
    apply_memory(pipe, MemoryConfig(offload=offload), "cpu", allow_cpu_offload=True)
    if offload == "model":
        assert pipe._all_hooks  # accelerate hooks installed
    else:
        from diffusers.hooks.group_offloading import _get_group_onload_device

        assert _get_group_onload_device(pipe.transformer) == torch.device("cpu")
    assert torch.equal(run(pipe), exact)
    assert torch.equal(run(pipe), exact)  # hooks survive a second run (model offload re-arms them)


def test_offload_presets_on_cpu_warn_and_stay_exact(load, run, exact, caplog):
    with caplog.at_level(logging.WARNING, logger="dsd_core.memory.apply"):
        pipe = load("24gb")
    assert "no effect on the CPU" in caplog.text
    assert torch.equal(run(pipe), exact)


@pytest.mark.skipif(CUDA, reason="checks the CPU behaviour")
def test_sequential_offload_is_cuda_only():
    pytest.skip("sequential offload (accelerate) needs an accelerator: with execution device 'cpu' accelerate fails "
                "moving transformers 5's CLIP weights (TypeError in set_module_tensor_to_device); load_pipeline "
                "ignores offload on the CPU")


def test_release_text_encoders(load, run, exact):
    pipe = load(MemoryConfig(release_text_encoders=True))
    first = run(pipe, image_guidance_scale=1.0)  # no true guidance: the empty prompt is encoded anyway
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert torch.equal(run(pipe), exact)  # same prompt, now with true guidance, from the cached embeddings
    assert torch.equal(first, run(load(), image_guidance_scale=1.0))
    with pytest.raises(InputError, match="released"):
        run(pipe, prompt="a different prompt")


def test_release_frees_the_encoders_under_model_offload(load, run, exact):
    import gc
    import weakref

    pipe = load(MemoryConfig(release_text_encoders=True))
    apply_memory(pipe, MemoryConfig(offload="model", release_text_encoders=True), "cpu", allow_cpu_offload=True)
    t5 = weakref.ref(pipe.text_encoder_2)
    assert torch.equal(run(pipe), exact)
    gc.collect()
    assert t5() is None  # no offload hook keeps T5 alive
    assert torch.equal(run(pipe), exact)


def test_fuse_lora_native(load, run, exact):
    pipe = load(MemoryConfig(fuse_lora=True))
    assert not getattr(pipe.transformer, "peft_config", None)  # adapter layers gone, weights merged
    got = run(pipe)
    close(got, exact, "fuse_lora")
    no_lora = run(load(lora=False))
    assert (no_lora - exact).abs().max() > 1e-2  # the LoRA matters, so fusing kept it


# ---------------------------------------------------------------------------------------------- fp8
def test_fp8_transformer(load, run, exact):
    pipe = load(MemoryConfig(transformer_weights="fp8"))
    tr = pipe.transformer
    assert tr.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert tr.transformer_blocks[0].norm1.linear.weight.dtype == torch.float8_e4m3fn  # AdaLN linears too
    assert tr.c_embedder.weight.dtype == torch.float32 and tr.x_embedder.weight.dtype == torch.float32
    assert tr.transformer_blocks[0].attn.to_q.lora_A["dsd"].weight.dtype == torch.float32  # LoRA kept
    assert tr.dtype == torch.float32
    got = run(pipe)
    assert close(got, exact, "fp8") > NOISE


def test_fp8_transformer_bf16(load, run, exact_bf16):
    got = run(load(MemoryConfig(transformer_weights="fp8"), dtype="bfloat16"))
    assert close(got, exact_bf16, "fp8_bf16") > NOISE


def test_12gb_preset_fp8_with_fused_lora(load, run, exact):
    pipe = load("12gb")
    assert not getattr(pipe.transformer, "peft_config", None)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert close(run(pipe), exact, "12gb") > NOISE


def test_fp8_text_encoders(load, run, exact):
    pipe = load(MemoryConfig(text_encoder_weights="fp8"))
    t5 = pipe.text_encoder_2
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    assert t5.shared.weight.dtype == torch.float32
    assert close(run(pipe), exact, "text_fp8") > NOISE


def test_group_offload_composes_with_fp8(load, run, exact):
    pipe = load(MemoryConfig(transformer_weights="fp8"))
    apply_memory(pipe, MemoryConfig(offload="group"), "cpu", allow_cpu_offload=True)  # fp8 is already applied
    assert close(run(pipe), exact, "fp8") > NOISE


# ---------------------------------------------------------------------------------------------- torchao
@needs_torchao
def test_int8_torchao(load, run, exact_bf16):
    pipe = load(MemoryConfig(transformer_weights="int8"), dtype="bfloat16")
    weight = pipe.transformer.transformer_blocks[0].ff.net[2].weight
    assert "Int8" in type(weight).__name__
    assert close(run(pipe), exact_bf16, "int8") > NOISE


@needs_torchao
def test_int4_torchao(load, run, exact_bf16):
    pipe = load(MemoryConfig(transformer_weights="int4"), dtype="bfloat16")
    weight = pipe.transformer.transformer_blocks[0].ff.net[2].weight
    assert "Int" in type(weight).__name__  # IntxUnpackedToInt8Tensor on the CPU, packed int4 on CUDA
    assert close(run(pipe), exact_bf16, "int4") > close(run(load(MemoryConfig(transformer_weights="int8"),
                                                                  dtype="bfloat16")), exact_bf16, "int8")


def test_torchao_missing_is_one_line(load, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(DSDError, match=r"pip install torchao") as e:
        load(MemoryConfig(transformer_weights="int8"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- bitsandbytes
@pytest.mark.skipif(CUDA, reason="checks the CPU error")
def test_nf4_without_cuda_names_the_alternatives(load):
    with pytest.raises(DSDError, match=r"CUDA.*int4.*gguf.*12gb") as e:
        load("8gb")
    assert "\n" not in str(e.value)
    with pytest.raises(DSDError, match="CUDA"):  # checked before resolving (downloading) anything
        load_pipeline(model="primecai/dsd_model", base="black-forest-labs/FLUX.1-dev", device="cpu",
                      memory=MemoryConfig.from_preset("8gb"))


@pytest.mark.skipif(not (CUDA and _has("bitsandbytes") and _has("torchao")),
                    reason="NF4 (bitsandbytes) and packed int4 (torchao) need a CUDA GPU with both packages")
@pytest.mark.parametrize("weights", ["nf4", "int4"])
def test_4bit_on_cuda(load, run, weights):  # pragma: no cover - needs a GPU
    exact = run(load(dtype="bfloat16", device="cuda"))
    got = run(load(MemoryConfig(transformer_weights=weights), dtype="bfloat16", device="cuda"))
    diff = (got - exact).abs()
    assert NOISE < float(diff.max()) <= 0.2 and float(diff.mean()) <= 0.025


@needs_cuda
def test_offload_modes_on_cuda(load, run):  # pragma: no cover - needs a GPU
    exact = run(load(dtype="bfloat16", device="cuda"))
    for memory in ("24gb", "lowest", MemoryConfig(offload="sequential"),
                   MemoryConfig(offload="group", group_offload_streams=False)):
        assert torch.equal(run(load(memory, dtype="bfloat16", device="cuda")), exact), memory


# ---------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def dsd_state(tiny_model):
    from dsd_core.transformer import DSDTransformer2DModel

    return DSDTransformer2DModel.from_pretrained(tiny_model["transformer"]).state_dict()


@needs_gguf
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_gguf_diffusers_layout(load, run, exact, dsd_state, tmp_path, quant):
    from dsd_core.memory import save_gguf

    path = save_gguf(dsd_state, str(tmp_path / f"dsd-{quant}.gguf"), quant)
    pipe = load(MemoryConfig.from_preset("full", gguf_file=path))
    tr = pipe.transformer
    assert type(tr.transformer_blocks[0].attn.to_q.base_layer).__name__ == "GGUFLinear"
    assert tr.c_embedder.weight.quant_type.name == quant  # c_embedder came from the file, quantized
    assert close(run(pipe), exact, f"gguf_{quant}") > NOISE
    assert len(tr.x_embedder._forward_hooks) == 1  # the condition hook follows the swapped-in GGUFLinear


@needs_gguf
def test_gguf_bfl_layout_with_prefix(load, run, exact, dsd_state, tmp_path):
    convert = pytest.importorskip("single_file_convert", reason="tests/single_file_convert.py (BFL writer) absent")
    from dsd_core.memory import save_gguf

    bfl = convert.transformer_to_bfl(dsd_state, prefix="model.diffusion_model.")
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in bfl
    path = save_gguf(bfl, str(tmp_path / "dsd-bfl-Q8_0.gguf"), "Q8_0")
    pipe = load(MemoryConfig(transformer_weights="gguf", gguf_file=path))
    assert close(run(pipe), exact, "gguf_Q8_0") > NOISE


@needs_gguf
def test_gguf_without_condition_hook_would_be_caught(load, run, exact, dsd_state, tmp_path):
    """The GGUF tolerance is tight enough to notice a lost c_embedder (the reference silently ignored)."""
    from dsd_core.memory import save_gguf

    pipe = load(MemoryConfig(transformer_weights="gguf", gguf_file=save_gguf(dsd_state, str(tmp_path / "a.gguf"))))
    pipe.transformer._hook_condition = lambda: None  # as if the hook had stayed on the replaced module
    pipe.transformer.x_embedder._forward_hooks.clear()
    diff = (run(pipe) - exact).abs()
    assert float(diff.max()) > TOLERANCES["gguf_Q8_0"][0] * 2


@needs_gguf
def test_gguf_errors(load, dsd_state, tmp_path):
    from dsd_core.memory import load_gguf_transformer, save_gguf

    plain = {k: v for k, v in dsd_state.items() if not k.startswith("c_embedder")}
    with pytest.raises(ModelFormatError, match="plain FLUX"):
        load_gguf_transformer(save_gguf(plain, str(tmp_path / "flux.gguf")), dtype=torch.float32)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(MemoryConfig(transformer_weights="gguf", gguf_file=str(tmp_path / "missing.gguf")))


def test_gguf_missing_package_is_one_line(monkeypatch, tmp_path):
    from dsd_core.memory import load_gguf_transformer

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(DSDError, match=r"pip install gguf"):
        load_gguf_transformer(str(tmp_path / "x.gguf"), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- config
def test_presets_and_switches():
    assert list(PRESETS) == ["full", "24gb", "16gb", "12gb", "8gb", "lowest"]
    assert MemoryConfig.from_preset("12gb") == MemoryConfig(transformer_weights="fp8", fuse_lora=True,
                                                            offload="model")
    assert MemoryConfig.from_preset("24gb").exact and not MemoryConfig.from_preset("16gb").exact
    cfg = MemoryConfig.from_preset("8gb", gguf_file="~/m/dsd-Q4_K.gguf")
    assert cfg.transformer_weights == "gguf" and cfg.gguf_file == os.path.expanduser("~/m/dsd-Q4_K.gguf")
    assert "8gb" in cfg.describe() and "dsd-Q4_K.gguf" in cfg.describe()
    assert MemoryConfig.from_preset("16gb", offload="group").offload == "group"
    assert MemoryConfig.from_name("24gb") == MemoryConfig(offload="model")
    assert set(MemoryConfig.help()) >= {"transformer_weights", "offload", "fuse_lora", "release_text_encoders"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(transformer_weights="fp4"), "unknown transformer_weights"),
    (dict(offload="disk"), "unknown offload"),
    (dict(transformer_weights="gguf"), "needs gguf_file"),
    (dict(gguf_file="x.gguf", transformer_weights="fp8"), "transformer_weights='gguf'"),
    (dict(fuse_lora=True, transformer_weights="int8"), "fuse_lora works with native or fp8"),
    (dict(group_offload_blocks=0), "group_offload_blocks"),
    (dict(release_text_encoders="yes"), "True or False"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(DSDError, match=match) as e:
        MemoryConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_resolve_errors(load):
    with pytest.raises(DSDError, match="unknown memory preset 'huge'; use one of full, 24gb"):
        MemoryConfig.from_name("huge")
    with pytest.raises(DSDError, match=r"memory must be a dsd_core.memory.MemoryConfig or None, got dict"):
        load({"offload": "model"})
    with pytest.raises(DSDError, match="unknown memory setting"):
        MemoryConfig.from_preset("full", colour="red")
