"""DSDPipeline behaviour beyond the contract every variant passes (tests/pipeline_contract.py, run on this fixture in
test_contract.py): the seed recipe, LoRA scale, output types, sizes, hooks, cancelling, input errors."""

import logging

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import conftest
from dsd_core import canvas as cv
from dsd_core.errors import InputError

SMALL = dict(height=256, width=512, num_inference_steps=3, image_guidance_scale=1.0)


@pytest.fixture
def img(reference_image):
    return reference_image.resize((256, 256))


def run(pipe, img, **kw):
    return conftest.run(pipe, img, **{**SMALL, **kw})


# ------------------------------------------------------------------ seeds
def test_seed_contract_two_separate_generators(fixture_pipe, img):
    """Seed S: posterior noise and initial noise each from a fresh CPU generator seeded with S."""
    seed = 1234
    noise = fixture_pipe.prepare_noise([seed], 256, 512)
    want = randn_tensor((1, 16, 32, 64), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    assert torch.equal(cv.unpack_latents(noise, 256, 512), want)

    ref = fixture_pipe._reference_tensor(img, 256, 256, "center_crop")
    cond = fixture_pipe.prepare_condition(ref, [seed], "sample")
    dist = fixture_pipe.vae.encode(cv.build_condition_canvas(ref)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator("cpu").manual_seed(seed))
    sf, sc = fixture_pipe.vae.config.shift_factor, fixture_pipe.vae.config.scaling_factor
    torch.testing.assert_close(cond, cv.pack_latents((dist.mean + dist.std * eps - sf) * sc), rtol=0, atol=1e-6)
    # mode: the posterior mean, whatever the seed
    mode = fixture_pipe.prepare_condition(ref, [seed], "mode")
    torch.testing.assert_close(mode, fixture_pipe.prepare_condition(ref, [7], "mode"), rtol=0, atol=0)
    torch.testing.assert_close(mode, cv.pack_latents((dist.mean - sf) * sc), rtol=0, atol=1e-6)


def test_runs_under_inference_mode_like_comfyui(fixture_pipe, img):
    want = run(fixture_pipe, img, seed=3, image_guidance_scale=1.5).images
    with torch.inference_mode():
        got = run(fixture_pipe, img, seed=3, image_guidance_scale=1.5).images
    assert torch.equal(got, want)


def test_random_seed_is_reported_and_reproduces(fixture_pipe, img):
    out = run(fixture_pipe, img, seed=None)
    assert isinstance(out.seeds[0], int)
    again = run(fixture_pipe, img, seed=out.seeds[0])
    assert torch.equal(out.images, again.images)


def test_explicit_seed_list_and_bad_lengths(fixture_pipe, img):
    out = run(fixture_pipe, img, seed=[5, 9], num_images_per_prompt=2, output_type="latent")
    assert out.seeds == [5, 9]
    with pytest.raises(InputError, match="2 seeds for 3 images"):
        run(fixture_pipe, img, seed=[1, 2], num_images_per_prompt=3)
    with pytest.raises(InputError, match="generators for 2 images"):
        run(fixture_pipe, img, generator=[torch.Generator()], num_images_per_prompt=2)


# ------------------------------------------------------------------ LoRA
def test_lora_scale(fixture_pipe, img):
    on = run(fixture_pipe, img, seed=1).images
    one = run(fixture_pipe, img, seed=1, lora_scale=1.0).images
    zero = run(fixture_pipe, img, seed=1, lora_scale=0.0).images
    half = run(fixture_pipe, img, seed=1, lora_scale=0.5).images
    assert torch.equal(on, one)
    assert (on - zero).abs().max() > 1e-3
    assert 0 < (half - zero).abs().max() and 0 < (half - on).abs().max()
    fixture_pipe.disable_lora()
    try:
        off = run(fixture_pipe, img, seed=1).images
    finally:
        fixture_pipe.enable_lora()
    torch.testing.assert_close(zero, off, rtol=0, atol=1e-6)
    # the scale is per call: the next default call is unchanged
    assert torch.equal(run(fixture_pipe, img, seed=1).images, on)


# ------------------------------------------------------------------ outputs
def test_output_types(fixture_pipe, img):
    out = run(fixture_pipe, img, seed=0)
    pil = run(fixture_pipe, img, seed=0, output_type="pil")
    assert pil.images[0].size == (256, 256) and pil.panels[0].size == (512, 256)
    arr = run(fixture_pipe, img, seed=0, output_type="np").images
    assert arr.shape == (1, 256, 256, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], out.images[0].permute(1, 2, 0).numpy())


def test_non_square_panel_and_mu_from_token_count(fixture_pipe, reference_image):
    out = fixture_pipe(reference_image, "a cat", height=256, width=384, num_inference_steps=2, seed=0,
                       output_type="pt")
    assert out.images.shape == (1, 3, 256, 192)
    mu = cv.compute_mu(cv.num_image_tokens(256, 384), fixture_pipe.scheduler.config)
    sigma = 1.0 / 2  # linspace(1, 1/N, N)[1] for N = 2, shifted with exp(mu)
    want = np.exp(mu) / (np.exp(mu) + (1 / sigma - 1))
    assert fixture_pipe.scheduler.sigmas[1].item() == pytest.approx(want, abs=1e-6)


def test_large_panel_warns(fixture_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="dsd_core.pipeline"):
        fixture_pipe.check_dsd_inputs(1024, 2048, 28, "sample", 1)
    assert "trained at 512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dsd_core.pipeline"):
        fixture_pipe.check_dsd_inputs(512, 1024, 28, "sample", 1)
    assert caplog.text == ""


def test_prompt_cleaning(fixture_pipe, img):
    out = run(fixture_pipe, img, prompt="  a red\n toy\r ", seed=0, output_type="latent")
    assert out.prompt == "a red toy"


# ------------------------------------------------------------------ progress and cancel
def test_progress_callback_gets_latents_and_may_raise_to_cancel(fixture_pipe, img):
    seen = []
    run(fixture_pipe, img, seed=0, progress_callback=lambda i, n, lat: seen.append((i, n, tuple(lat.shape))))
    assert seen == [(1, 3, (1, 512, 64)), (2, 3, (1, 512, 64)), (3, 3, (1, 512, 64))]

    class Stop(Exception):
        pass

    def stop_at_two(i, n, lat):
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        run(fixture_pipe, img, seed=0, progress_callback=stop_at_two)


# ------------------------------------------------------------------ per-call hooks
def test_call_hooks_run_at_their_points_in_order(fixture_pipe, img):
    """The mechanism memory and speed settings use: named hooks, run at four fixed points of each call."""
    import contextlib
    import dataclasses

    from dsd_core.hooks import CallHook

    events = []

    class Recorder(CallHook):
        def guidance(self, guidance, num_inference_steps):
            events.append(("guidance", num_inference_steps))
            return dataclasses.replace(guidance, end_step=3)

        def encode(self, key, compute):
            events.append(("encode", key[0]))
            return compute()

        def before_denoising(self, pipe, prompts, encode):
            events.append(("before", tuple(prompts)))

        def branch(self, pipe, name):
            events.append(("branch", name))
            return contextlib.nullcontext()

    fixture_pipe.set_call_hook("recorder", Recorder())
    try:
        run(fixture_pipe, img, seed=0, prompt="a cat", image_guidance_scale=1.5, num_inference_steps=4)
    finally:
        fixture_pipe.set_call_hook("recorder", None)
    assert "recorder" not in fixture_pipe.call_hooks
    assert events[:4] == [("guidance", 4), ("encode", "a cat"), ("encode", ""), ("before", ("a cat", ""))]
    # steps 0-1 one pass, step 2 the reference's three passes, step 3 after the window the hook set
    assert [name for _, name in events[4:]] == ["cond", "cond", "cond", "uncond", "image", "cond"]


# ------------------------------------------------------------------ input errors
@pytest.mark.parametrize("kw,match", [
    (dict(height=250), "multiple of 16"),
    (dict(num_inference_steps=0), "at least 1"),
    (dict(condition_sampling="mean"), "'sample' or 'mode'"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "not available"),
])
def test_input_errors(fixture_pipe, img, kw, match):
    with pytest.raises(InputError, match=match):
        run(fixture_pipe, img, seed=0, **kw)


def test_bad_reference_inputs(fixture_pipe):
    with pytest.raises(InputError, match=r"shape \(1, 3, 256, 256\)"):
        run(fixture_pipe, torch.zeros(1, 3, 10, 10), seed=0)
    with pytest.raises(InputError, match="PIL image or a tensor"):
        run(fixture_pipe, "cat.png", seed=0)
