"""SVD compression of concept deltas (Custom Diffusion's ``compress.py``, personalization-methods.md §3).

For every tuned matrix: ``dW = U diag(s) V^T``; keep the top ``r`` singular values, where ``r`` is the index at
which the cumulative normalised singular-value sum ``cumsum(s) / sum(s)`` first exceeds ``energy`` (0.6, CD's
default) -- CD keeps the values *before* that index, and so do we, except that at least one is always kept (CD would
drop a layer whose first singular value alone exceeds the fraction). Or a fixed ``rank``. Store ``up = U_r diag(s_r)``
and ``down = V_r^T``. Low-rank deltas are re-ranked exactly without forming the dense matrix (QR of both factors,
then the SVD of an r x r core). Modifier tokens are kept as they are.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

from ..errors import InputError
from .delta_file import ConceptFile, is_dsd
from .parameters import ConceptDeltas, LayerDelta

DEFAULT_ENERGY = 0.6


def _svd(layer: LayerDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not layer.low_rank:
        return torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    up, down = layer.up.detach().double() * layer.scale, layer.down.detach().double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def keep_rank(s: torch.Tensor, energy: float | None = DEFAULT_ENERGY, rank: int | None = None) -> int:
    """How many singular values to keep: a fixed ``rank`` (capped), or CD's cumulative-sum rule at ``energy``."""
    n = int((s > 0).sum())
    if n == 0:
        return 1
    if rank is not None:
        return max(1, min(int(rank), n))
    frac = torch.cumsum(s, 0) / s.sum()
    above = torch.nonzero(frac > energy)
    i = int(above[0]) if len(above) else n
    return max(1, min(i, n))


@dataclass
class LayerReport:
    name: str
    rank_before: int | None  # None: full
    rank_after: int
    params_before: int
    params_after: int
    relative_error: float  # ||dW - dW_r||_F / ||dW||_F


def compress(concept: ConceptFile, energy: float | None = DEFAULT_ENERGY, rank: int | None = None
             ) -> tuple[ConceptFile, list[LayerReport]]:
    """A compressed copy of ``concept`` and a per-layer report."""
    if rank is None and (energy is None or not 0 < energy <= 1):
        raise InputError(f"energy must be in (0, 1] (CD uses 0.6), got {energy}; or pass a fixed rank.")
    if rank is not None and rank < 1:
        raise InputError(f"rank must be at least 1, got {rank}.")
    layers, report = [], []
    for layer in concept.deltas.layers:
        u, s, vh = _svd(layer)
        r = keep_rank(s, energy, rank)
        up, down = (u[:, :r] * s[:r]).float(), vh[:r].float()
        total = float(s.pow(2).sum())
        err = (float(s[r:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
        layers.append(LayerDelta.from_tensors(layer.target, up=up, down=down))
        before = sum(p.numel() for p in layer.parameters())
        report.append(LayerReport(layer.target.name, layer.rank, r, before, up.numel() + down.numel(), err))
    info = dict(concept.info)
    info["compression"] = {"energy": None if rank is not None else energy, "rank": rank,
                           "ranks": [r.rank_after for r in report]}
    return ConceptFile(ConceptDeltas(layers), concept.tokens, concept.probe, info), report


def file_size(concept: ConceptFile, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the concept takes as a file (written to a temporary file and measured)."""
    fd, tmp = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        concept.save(tmp, dtype)
        return os.path.getsize(tmp)
    finally:
        os.remove(tmp)


def format_report(report: list[LayerReport], size_before: int | None = None, size_after: int | None = None,
                  output_change: float | None = None) -> str:
    before = sum(r.params_before for r in report)
    after = sum(r.params_after for r in report)
    ranks = [r.rank_after for r in report]
    worst = max(report, key=lambda r: r.relative_error)
    lines = [f"compressed {len(report)} layers: {before:,d} -> {after:,d} delta parameters "
             f"({after / max(before, 1):.1%}); ranks {min(ranks)}-{max(ranks)}",
             f"weight error (||dW - dW_r|| / ||dW||): mean {sum(r.relative_error for r in report) / len(report):.3f}, "
             f"max {worst.relative_error:.3f} ({worst.name})"]
    if size_before is not None and size_after is not None:
        lines.append(f"file size: {size_before / 2**20:.2f} MiB -> {size_after / 2**20:.2f} MiB "
                     f"({size_after / max(size_before, 1):.1%})")
    if output_change is not None:
        lines.append(f"output change (relative, transformer velocity on the check prompt): {output_change:.4f}")
    return "\n".join(lines)


@torch.no_grad()
def output_change(pipe, a: ConceptFile, b: ConceptFile, prompt: str, size: int = 256, seed: int = 0,
                  sigma: float = 0.7) -> float:
    """``||v_b - v_a|| / ||v_a - v_base||``: how much ``b`` changes the transformer's velocity relative to how much
    ``a`` changes it (one forward pass each, fixed noise, ``prompt``; DSD uses a zero condition)."""
    from .. import canvas as cv

    width = 2 * size if is_dsd(pipe) else size
    dev = pipe._execution_device
    dtype = pipe.transformer.dtype
    h, w = cv.latent_size(size, width, pipe.vae_scale_factor)
    ch = pipe.transformer.config.in_channels // 4
    x = cv.pack_latents(torch.randn(1, ch, h, w, generator=torch.Generator().manual_seed(seed))).to(dev, dtype)
    img_ids = cv.latent_image_ids(size, width, dev, dtype, pipe.vae_scale_factor)
    kwargs = {"condition_hidden_states": torch.zeros_like(x)} if is_dsd(pipe) else {}
    g = torch.full((1,), 3.5, device=dev) if pipe.transformer.config.guidance_embeds else None

    def velocity():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, None, device=dev, max_sequence_length=128)
        return pipe.transformer(hidden_states=x, timestep=torch.full((1,), sigma, device=dev, dtype=dtype),
                                guidance=g, pooled_projections=pooled, encoder_hidden_states=embeds,
                                txt_ids=text_ids, img_ids=img_ids, return_dict=False, **kwargs)[0].float()

    outs = []
    for concept, with_deltas in ((a, False), (a, True), (b, True)):  # base: a's tokens, no deltas
        if concept.tokens is not None:
            concept.tokens.attach(pipe)
        if with_deltas:
            concept.deltas.attach(pipe.transformer)
        try:
            outs.append(velocity())
        finally:
            concept.deltas.detach()
            if concept.tokens is not None:
                concept.tokens.detach()
    base, va, vb = outs
    return float((vb - va).norm() / (va - base).norm().clamp_min(1e-12))
