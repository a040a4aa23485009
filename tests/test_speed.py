"""Speed options: exact mode by default, First Block Cache per true-guidance branch, the guidance window, attention
backends, regional compile (with the ``eager`` backend, so no C++ compile in the test)."""

from __future__ import annotations

import pytest
import torch

import conftest
from dsd_core.errors import DSDError
from dsd_core.speed import (SpeedConfig, apply_speed, attention_backends, check_attention_backend,
                            true_guidance_end_step, usable_attention_backends)

RUN = dict(num_inference_steps=6, seed=3, prompt="a toy on a chair")  # over conftest.RUN


@pytest.fixture
def pipe(make_pipe):
    return make_pipe()


@pytest.fixture(scope="module")
def run(reference_image):
    def _run(p, **kw):
        return conftest.run(p, reference_image, **{**RUN, **kw}).images

    return _run


@pytest.fixture(scope="module")
def exact(make_pipe, run):
    p = make_pipe()
    out = {b: run(p, batch_true_guidance=b) for b in (False, True)}
    out["3 steps"] = run(p, num_inference_steps=3)
    return out


def full_passes(p) -> dict:
    """Counts executions of the last block's body (skipped when the cache reuses the residual)."""
    count = {"n": 0}
    p.transformer.single_transformer_blocks[-1].proj_out.register_forward_pre_hook(
        lambda *a: count.__setitem__("n", count["n"] + 1))
    return count


def test_exact_is_the_default(pipe, run, exact):
    config = apply_speed(pipe)
    assert config == SpeedConfig() and config.is_exact and config.call_kwargs(28) == {}
    assert not pipe.transformer.is_cache_enabled and "speed" not in pipe.call_hooks
    assert SpeedConfig.from_name("exact") == SpeedConfig() and SpeedConfig.from_name("fast") == SpeedConfig.fast()
    with pytest.raises(DSDError, match="unknown speed mode 'turbo'; use one of exact, fast"):
        SpeedConfig.from_name("turbo")
    with pytest.raises(DSDError, match=r"speed must be a dsd_core.speed.SpeedConfig.*from_name\('fast'\)"):
        apply_speed(pipe, "fast")
    assert torch.equal(run(pipe), exact[False])


@pytest.mark.parametrize("batched", [False, True])
def test_first_block_cache_threshold_zero_is_exact(pipe, run, exact, batched):
    apply_speed(pipe, SpeedConfig(first_block_cache=0.0))
    assert torch.equal(run(pipe, batch_true_guidance=batched), exact[batched])


def test_first_block_cache_keeps_one_state_per_guidance_branch(pipe, run, exact):
    """With a threshold that always reuses, each branch computes fully only on its first call: cond at step 0,
    uncond and image-only at step 2 (true guidance starts there) -> 3 full passes of 6 + 4 * 2 = 14 calls."""
    apply_speed(pipe, SpeedConfig(first_block_cache=0.99))
    count = full_passes(pipe)
    a = run(pipe)
    assert count["n"] == 3
    b = run(pipe)  # state is reset between runs: same result, same count
    assert torch.equal(a, b) and count["n"] == 6
    assert torch.isfinite(a).all() and (a - exact[False]).abs().max() > 1e-4
    count["n"] = 0
    run(pipe, batch_true_guidance=True)  # batched: one state for the batch of three
    assert count["n"] == 2


def test_first_block_cache_moderate_threshold_is_close(pipe, run, exact):
    apply_speed(pipe, SpeedConfig(first_block_cache=0.3))
    count = full_passes(pipe)
    got = run(pipe)
    assert 3 < count["n"] < 14  # some steps skipped
    assert (got - exact[False]).abs().max() < 0.05


def test_fast_mode_guidance_window(pipe, run):
    fast = SpeedConfig.fast()
    assert fast.first_block_cache == 0.08 and fast.true_guidance_end is None and not fast.is_exact
    speed = SpeedConfig.fast(true_guidance_end=0.6)
    assert speed.call_kwargs(28) == {"true_guidance_end_step": 17}
    assert true_guidance_end_step(0.6, 6) == 4
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    run(pipe, **SpeedConfig(true_guidance_end=0.6).call_kwargs(RUN["num_inference_steps"]))
    assert len(calls) == 2 + 2 * 3 + 2  # steps 0-1 one pass, 2-3 three passes, 4-5 one pass
    calls.clear()
    apply_speed(pipe, SpeedConfig(true_guidance_end=0.6))  # the same window through the pipeline's speed hook
    run(pipe)
    assert len(calls) == 2 + 2 * 3 + 2
    calls.clear()
    run(pipe, true_guidance_end_step=3)  # an explicit window in the call wins
    assert len(calls) == 2 + 1 * 3 + 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(compile="max"), "unknown compile mode"),
    (dict(first_block_cache=1.5), "threshold"),
    (dict(true_guidance_end=0.0), "fraction"),
    (dict(attention_backend="warp"), "unknown attention backend 'warp'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(DSDError, match=match):
        SpeedConfig(**kwargs)


def test_attention_backend_names_and_math_backend(pipe, run, exact):
    assert "native" in attention_backends() and "native" in usable_attention_backends()
    assert check_attention_backend(" Native ") == "native"
    apply_speed(pipe, SpeedConfig(attention_backend="_native_math"))
    torch.testing.assert_close(run(pipe), exact[False], rtol=0, atol=1e-5)


def test_attention_backend_not_installed_is_one_line():
    missing = [b for b in ("flash", "sage", "xformers") if b not in usable_attention_backends()]
    if not missing:
        pytest.skip("flash-attn, sageattention and xformers are all installed")
    with pytest.raises(DSDError, match=f"'{missing[0]}' cannot be used here: .*Installed here: .*native") as e:
        check_attention_backend(missing[0])
    assert "\n" not in str(e.value)


def test_regional_compile_eager_backend_is_exact(pipe, run, exact):
    apply_speed(pipe, SpeedConfig(compile="regional", compile_backend="eager"))
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert getattr(pipe.transformer, "_compiled_call_impl", None) is None  # only the blocks
    torch.testing.assert_close(run(pipe, num_inference_steps=3), exact["3 steps"], rtol=0, atol=1e-5)
