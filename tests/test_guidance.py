"""True guidance: the gate, the formula, and the pipeline against a naive three-pass loop written from the paper."""

import numpy as np
import pytest
import torch

from dsd_core import canvas as cv
from dsd_core.guidance import TrueGuidance, combine


def test_gate_matches_reference():
    g = TrueGuidance(1.5, 1.0)
    assert [g.active(i) for i in range(4)] == [False, False, True, True]
    assert g.passes(28) == 3 * 28 - 4
    off = TrueGuidance(1.0, 7.0)  # s_t alone does nothing: the reference gates on s_i > 1 only
    assert not off.enabled and off.passes(28) == 28
    assert not TrueGuidance(0.5, 2.0).enabled
    window = TrueGuidance(2.0, 1.0, start_step=1, end_step=3)
    assert [window.active(i) for i in range(5)] == [False, True, True, False, False]
    with pytest.raises(ValueError):
        TrueGuidance(2.0, 1.0, start_step=3, end_step=2)


def test_formula_and_order():
    torch.manual_seed(0)
    v_ti, v_ui, v_uu = (torch.randn(2, 8, 4) for _ in range(3))
    s_i, s_t = 1.7, 0.6
    want = v_uu + s_i * (v_ui - v_uu) + s_t * (v_ti - v_ui)
    assert torch.equal(combine(v_ti, v_ui, v_uu, s_i, s_t), want)
    # s_i = s_t = 1 collapses to the full conditional prediction
    torch.testing.assert_close(combine(v_ti, v_ui, v_uu, 1.0, 1.0), v_ti)
    # bf16: evaluated in bf16, in that order
    b = [x.bfloat16() for x in (v_ti, v_ui, v_uu)]
    out = combine(*b, s_i, s_t)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, b[2] + s_i * (b[1] - b[2]) + s_t * (b[0] - b[1]))


@torch.no_grad()
def naive_latents(pipe, image, prompt, seed, steps, g, s_i, s_t, height=256, width=512):
    """Three sequential passes per step, spelled out without any pipeline helpers for the loop."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    ref = pipe._reference_tensor(image, height, width // 2, "center_crop")
    cond = pipe.prepare_condition(ref, [seed], "sample")
    x = pipe.prepare_noise([seed], height, width)
    emb, pooled, txt_ids = pipe.encode_prompt(prompt, prompt_2=None)
    nemb, npooled, _ = pipe.encode_prompt("", prompt_2=None)
    ids = cv.latent_image_ids(height, width)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ts, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=sigmas, mu=cv.compute_mu(x.shape[1], pipe.scheduler.config))
    guidance = torch.tensor([g], dtype=torch.float32)

    def f(e, p, c):
        return pipe.transformer(hidden_states=x, timestep=t.expand(1).to(x.dtype) / 1000, guidance=guidance,
                                pooled_projections=p, encoder_hidden_states=e, txt_ids=txt_ids, img_ids=ids,
                                condition_hidden_states=c, return_dict=False)[0]

    for i, t in enumerate(ts):
        v = f(emb, pooled, cond)
        if s_i > 1.0 and i >= 2:
            vu = f(nemb, npooled, torch.zeros_like(cond))
            vi = f(nemb, npooled, cond)
            v = vu + s_i * (vi - vu) + s_t * (v - vi)
        x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("s_i,s_t", [(1.5, 1.0), (2.0, 0.5), (1.0, 3.0)])
def test_pipeline_equals_naive_three_pass_loop(fixture_pipe, reference_image, s_i, s_t):
    img = reference_image.resize((256, 256))
    kw = dict(height=256, width=512, num_inference_steps=4, guidance_scale=3.0, seed=11)
    got = fixture_pipe(img, "a cat", image_guidance_scale=s_i, text_guidance_scale=s_t, output_type="latent", **kw)
    want = naive_latents(fixture_pipe, img, "a cat", 11, 4, 3.0, s_i, s_t)
    assert torch.equal(got.images, want)


def test_text_scale_ignored_without_image_scale(fixture_pipe, reference_image):
    img = reference_image.resize((256, 256))
    kw = dict(height=256, width=512, num_inference_steps=3, seed=2, output_type="latent")
    a = fixture_pipe(img, "a dog", image_guidance_scale=1.0, text_guidance_scale=1.0, **kw).images
    b = fixture_pipe(img, "a dog", image_guidance_scale=1.0, text_guidance_scale=4.0, **kw).images
    c = fixture_pipe(img, "a dog", image_guidance_scale=1.5, text_guidance_scale=4.0, **kw).images
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batched_true_guidance_equals_sequential(fixture_pipe, reference_image):
    img = reference_image.resize((256, 256))
    kw = dict(height=256, width=512, num_inference_steps=4, seed=5, image_guidance_scale=1.8,
              text_guidance_scale=1.3, output_type="latent")
    seq = fixture_pipe(img, "a toy", **kw).images
    bat = fixture_pipe(img, "a toy", batch_true_guidance=True, **kw).images
    torch.testing.assert_close(bat, seq, rtol=0, atol=1e-5)


def test_pass_counts(fixture_pipe, reference_image):
    calls = []
    h = fixture_pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(bool((k["condition_hidden_states"] == 0).all())), with_kwargs=True)
    try:
        img = reference_image.resize((256, 256))
        fixture_pipe(img, "x", height=256, width=512, num_inference_steps=5, seed=0, image_guidance_scale=2.0,
                     output_type="latent")
        assert len(calls) == 3 * 5 - 4 and sum(calls) == 3
        calls.clear()
        fixture_pipe(img, "x", height=256, width=512, num_inference_steps=5, seed=0, image_guidance_scale=2.0,
                     batch_true_guidance=True, output_type="latent")
        assert len(calls) == 5  # one (batched) call per step
    finally:
        h.remove()
