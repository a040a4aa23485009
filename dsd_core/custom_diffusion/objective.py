"""Custom Diffusion's objective on FLUX: flow matching on packed latents, masked instance term plus prior term.

For a batch of instance samples (and, with prior preservation, as many class samples)::

    x0 = (VAE(x).sample - shift) * scale, packed 2x2    eps ~ N(0, I)    sigma ~ logit-normal(0, 1)
    x_t = (1 - sigma) x0 + sigma eps                     target v = eps - x0
    L_inst  = mean_b [ sum_tokens(m * mean_ch (v_hat - v)^2) / sum_tokens(m) ]      (m: the packed-token mask)
    L_class = mean (v_hat - v)^2
    L = L_inst + prior_loss_weight * L_class

as in CD (§1.4, 1.6) with epsilon replaced by FLUX's velocity. One deliberate difference from the SD script: its
instance term sums over the 4 latent channels but divides by the 1-channel mask area, i.e. weighs the instance term
4x relative to the prior term. Here both terms are per-element means; ``prior_loss_weight=0.25`` restores the SD
script's ratio. The transformer sees ``timestep = sigma`` (the pipeline's ``t / 1000``) and a constant distilled
guidance value (default 1.0, as SimpleTuner and kohya train FLUX.1-dev; training-notes.md). DSD samples are 1x2
canvases whose condition (reference | black, VAE-encoded the same way) goes to ``c_embedder``.
"""

from __future__ import annotations

import torch

from .. import canvas as cv

from .options import SIGMA_SCHEMES  # noqa: E402  (the option lists live with the light options)


def sample_sigmas(n: int, generator: torch.Generator | None = None, scheme: str = "logit_normal",
                  device=None) -> torch.Tensor:
    """``n`` noise levels in (0, 1): ``sigmoid(N(0, 1))`` (diffusers' FLUX default) or uniform."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    elif scheme == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown sigma scheme {scheme!r}; use one of {SIGMA_SCHEMES}")
    return u.clamp(1e-3, 1.0).to(device) if device is not None else u.clamp(1e-3, 1.0)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> shifted, scaled latents ``(B, 16, H/8, W/8)`` (a posterior sample)."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator=generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_condition(vae, references: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DSD condition: ``(B, 3, H, Wp)`` references -> packed latents of the (reference | black) canvas."""
    return cv.pack_latents(encode_pixels(vae, cv.build_condition_canvas(references), generator))


def flow_matching_loss(transformer, latents: torch.Tensor, token_masks: torch.Tensor | None, prompt_embeds,
                       pooled, text_ids, sigmas: torch.Tensor, noise: torch.Tensor, guidance: float = 1.0,
                       condition: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample masked flow-matching loss ``(B,)`` on packed latents (see module docstring)."""
    b, c, h, w = latents.shape
    dtype = next(p for p in transformer.parameters()).dtype
    x0 = cv.pack_latents(latents)
    eps = cv.pack_latents(noise)
    s = sigmas.view(-1, 1, 1).to(x0)
    noisy = (1.0 - s) * x0 + s * eps
    img_ids = cv.latent_image_ids(h * 8, w * 8, x0.device, dtype)
    kwargs = {}
    if condition is not None:
        kwargs["condition_hidden_states"] = condition.to(dtype)
    g = None
    if transformer.config.guidance_embeds:
        g = torch.full((b,), float(guidance), device=x0.device, dtype=torch.float32)
    pred = transformer(hidden_states=noisy.to(dtype), timestep=sigmas.to(x0.device, dtype), guidance=g,
                       pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
                       txt_ids=text_ids, img_ids=img_ids, return_dict=False, **kwargs)[0]
    err = (pred.float() - (eps - x0).float()).pow(2).mean(-1)  # (B, tokens)
    if token_masks is None:
        return err.mean(-1)
    m = token_masks.to(err)
    return (err * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def custom_diffusion_loss(instance_losses: torch.Tensor, class_losses: torch.Tensor | None,
                          prior_loss_weight: float = 1.0) -> torch.Tensor:
    """``L_inst + prior_loss_weight * L_class`` from per-sample losses."""
    loss = instance_losses.mean()
    if class_losses is not None and class_losses.numel():
        loss = loss + prior_loss_weight * class_losses.mean()
    return loss
