"""Block importance: how much the teacher's output changes when one block is skipped.

For each block ``k`` of each kind, the teacher runs on the calibration inputs with that block removed (its input passes
straight through), and the score is the velocity's mean squared change relative to the full teacher's velocity::

    score_k = mean over inputs of |v_without_k - v|^2 / |v|^2

(Flux.1-lite's input-output criterion measured where it matters: at the model output, on DSD canvases.) A high score
means the block is needed; :meth:`StudentLayout.from_preset` with ``selection="importance"`` keeps the highest.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layout import DOUBLE, SINGLE


@contextlib.contextmanager
def skipped(model, kind: str, index: int):
    """Within the context ``model`` runs without block ``index`` of ``kind`` (``transformer_blocks`` or
    ``single_transformer_blocks``)."""
    blocks = getattr(model, kind)
    setattr(model, kind, nn.ModuleList([b for i, b in enumerate(blocks) if i != index]))
    try:
        yield
    finally:
        setattr(model, kind, blocks)


@torch.no_grad()
def block_importance(teacher, inputs: list[dict], progress=None) -> dict[str, list[float]]:
    """``{"double": [score per block], "single": [...]}`` over ``inputs`` (transformer kwargs, see
    :func:`dsd_core.distill.data.noisy_inputs`). ``progress(done, total)`` is called after each block."""
    reference = [teacher(**kw)[0].float() for kw in inputs]
    norms = [r.pow(2).mean().clamp_min(1e-12) for r in reference]
    kinds = (("double", DOUBLE), ("single", SINGLE))
    total = sum(len(getattr(teacher, attr)) for _, attr in kinds)
    scores: dict[str, list[float]] = {}
    done = 0
    for key, attr in kinds:
        scores[key] = []
        for k in range(len(getattr(teacher, attr))):
            with skipped(teacher, attr, k):
                change = [(teacher(**kw)[0].float() - r).pow(2).mean() / n
                          for kw, r, n in zip(inputs, reference, norms)]
            scores[key].append(float(torch.stack(change).mean()))
            done += 1
            if progress is not None:
                progress(done, total)
    return scores
