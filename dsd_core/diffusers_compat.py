"""The few private diffusers functions DSD relies on, in one place (tested against the pinned diffusers in
``tests/test_diffusers_compat.py``). Everything else uses diffusers' public API.

* FLUX's latent packing and position ids (``FluxPipeline._pack_latents`` / ``_unpack_latents`` /
  ``_prepare_latent_image_ids``): static helpers every FLUX pipeline in diffusers uses; no public alias exists.
* the requirement check of an attention backend (``attention_dispatch._check_attention_backend_requirements``):
  ``set_attention_backend`` runs it only when the backend is set; we want to list usable backends up front.
"""

from __future__ import annotations


def pack_latents(latents):
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, C * 4)``, FLUX's 2x2 patch packing."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed, height: int, width: int, vae_scale_factor: int):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, height, width, vae_scale_factor)


def latent_image_ids(h2: int, w2: int, device, dtype):
    """Position ids ``[0, r, c]`` for an ``h2 x w2`` grid of packed tokens."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h2, w2, device, dtype)


def attention_backend_problem(name: str) -> str | None:
    """Why diffusers' attention backend ``name`` cannot run here (first line of its message), or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError, ValueError) as e:
        return str(e).strip().splitlines()[0]
    return None
