"""Cheap previews of the latents during sampling (no VAE decode)."""

from __future__ import annotations

import PIL.Image
import torch

from . import canvas as cv


def latent_preview(latents: torch.Tensor, height: int, width: int, rgb_factors=None, rgb_bias=None,
                   vae_scale_factor: int = 8) -> PIL.Image.Image:
    """RGB preview of the generated (right) half of image 0 from packed latents, at latent resolution.

    ``rgb_factors`` (``latent_channels x 3``) and ``rgb_bias`` (3) project latents to RGB, e.g. ComfyUI's FLUX
    latent format factors; without them the first three channels are stretched to the full range.
    """
    lat = cv.unpack_latents(latents[:1].detach().float().cpu(), height, width, vae_scale_factor)[0]
    lat = lat[:, :, lat.shape[-1] // 2:]
    if rgb_factors is not None:
        factors = torch.tensor(rgb_factors, dtype=torch.float32)
        rgb = torch.einsum("chw,cr->rhw", lat, factors)
        if rgb_bias is not None:
            rgb = rgb + torch.tensor(rgb_bias, dtype=torch.float32)[:, None, None]
        rgb = ((rgb + 1) / 2).clamp(0, 1)
    else:
        rgb = lat[:3]
        lo = rgb.amin(dim=(1, 2), keepdim=True)
        hi = rgb.amax(dim=(1, 2), keepdim=True)
        rgb = (rgb - lo) / (hi - lo).clamp_min(1e-6)
    arr = (rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return PIL.Image.fromarray(arr)
