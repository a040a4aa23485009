"""The DSD canvas: a 1x2 panel (reference left, generated right) and its packed latent form.

DSD generates one ``height x width`` canvas whose left half is the reference and whose right half is the new image.
The condition is that canvas with the right half set to black (-1), VAE-encoded in *one* call. Latents are packed
into 2x2 patches exactly like FLUX (token ``r * (W/2) + c``, channel ``ch * 4 + dy * 2 + dx``), and condition and
image latents share the same tokens and position ids ``[0, r, c]``.

Small pure functions, each usable alone. Packing itself is diffusers' (through :mod:`dsd_core.diffusers_compat`).
"""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from . import diffusers_compat
from .errors import InputError
from .options import PANEL as TRAINED_PANEL  # noqa: F401  (the panel DSD was trained at; each half of 512x1024)

#: Spatial downscale of the FLUX VAE (8) times the 2x2 packing: canvas sizes must be multiples of this.
CANVAS_MULTIPLE = 16


def check_canvas_size(height: int, width: int, multiple: int = CANVAS_MULTIPLE) -> None:
    """Raise :class:`InputError` unless ``height`` and each panel (``width / 2``) are positive multiples of 16."""
    if height <= 0 or width <= 0 or height % multiple or width % (2 * multiple):
        raise InputError(
            f"canvas {width}x{height} is not valid: height must be a multiple of {multiple} and width twice a multiple "
            f"of {multiple} (two panels side by side), e.g. 512x1024 or 768x1536."
        )


def build_condition_canvas(reference: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, Wp)`` reference in [-1, 1] -> ``(B, 3, H, 2*Wp)`` canvas with a black (-1) right half."""
    black = torch.full_like(reference, -1.0)
    return torch.cat([reference, black], dim=3)


def split_canvas(canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``(..., W)`` pixel canvas into its (left, right) halves along the last dimension."""
    half = canvas.shape[-1] // 2
    return canvas[..., :half], canvas[..., half:]


def latent_size(height: int, width: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Unpacked latent (h, w) of a pixel canvas, as FLUX computes it (``2 * (H // (vae_scale * 2))``)."""
    return 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, C * 4)``, FLUX's 2x2 patch packing."""
    return diffusers_compat.pack_latents(latents)


def unpack_latents(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a ``height x width`` pixel canvas."""
    return diffusers_compat.unpack_latents(packed, height, width, vae_scale_factor)


def latent_image_ids(height: int, width: int, device=None, dtype=None, vae_scale_factor: int = 8) -> torch.Tensor:
    """Position ids ``[0, r, c]`` (row-major) for the packed tokens of a ``height x width`` canvas."""
    h, w = latent_size(height, width, vae_scale_factor)
    return diffusers_compat.latent_image_ids(h // 2, w // 2, device, dtype)


def num_image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    h, w = latent_size(height, width, vae_scale_factor)
    return (h // 2) * (w // 2)


def compute_mu(image_seq_len: int, scheduler_config) -> float:
    """Timestep shift ``mu`` for a token count, from the scheduler's FLUX config (0.80333 for 2048 tokens)."""
    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
