"""The distillation objective (BK-SDM's, applied to FLUX/DSD)::

    L = L_flow + lambda_out * |v_S - v_T|^2 + lambda_feat * sum_l |h_S^l - h_T^map(l)|^2

* ``L_flow``: flow matching on the DSD canvas, ``MSE(v_S, eps - x0)`` (the task loss of the training engine);
* ``L_out``: MSE between student and teacher velocities on the same noisy input (teacher under ``no_grad``);
* ``L_feat``: over the mapped block pairs (:meth:`StudentLayout.feature_map`), the per-pair mean squared difference of
  both streams, summed over pairs (BK-SDM: an unweighted sum of per-stage means).

Defaults lambda_out = lambda_feat = 0.5 (BK-SDM as used by segmind/distill-sd and the on-device personalisation
project); 1/1 is the official BK-SDM setting.

**Massive activations.** FLUX's residual stream carries a few channels whose values are orders of magnitude larger than
the rest; a plain MSE on block outputs is then dominated by them (and explodes in bf16). ``massive``:

* ``normalize`` (default): both features are divided, channel by channel, by the teacher's RMS of that channel over
  the batch's tokens (detached), so every channel weighs the same;
* ``mask``: elements where the teacher's magnitude exceeds ``mask_threshold`` (20) x the median magnitude of that
  sample's tensor are left out (TinyFusion's masked KD; the median, unlike the RMS, is not moved by the massive
  channels themselves);
* ``none``: plain MSE (the reference behaviour of BK-SDM on U-Nets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError

from .options import MASSIVE_MODES  # noqa: E402  (defined with the options, which must stay light)


@dataclass(frozen=True)
class DistillWeights:
    flow: float = 1.0
    out: float = 0.5
    feat: float = 0.5
    massive: str = "normalize"
    mask_threshold: float = 20.0

    def __post_init__(self):
        if self.massive not in MASSIVE_MODES:
            raise InputError(f"unknown massive-activation handling {self.massive!r}; choose one of "
                             f"{', '.join(MASSIVE_MODES)}.")
        if min(self.flow, self.out, self.feat) < 0:
            raise InputError("distillation loss weights must not be negative.")


def feature_distance(h_s: torch.Tensor, h_t: torch.Tensor, massive: str = "normalize",
                     mask_threshold: float = 20.0) -> torch.Tensor:
    """Mean squared difference of two ``(B, tokens, channels)`` features, massive activations handled."""
    h_s, h_t = h_s.float(), h_t.float().detach()
    if massive == "normalize":
        scale = h_t.pow(2).mean(dim=(0, 1), keepdim=True).sqrt().clamp_min(1e-6)
        return F.mse_loss(h_s / scale, h_t / scale)
    if massive == "mask":
        typical = h_t.abs().flatten(1).median(dim=1).values.view(-1, *([1] * (h_t.ndim - 1)))
        keep = (h_t.abs() <= mask_threshold * typical).float()
        return ((h_s - h_t).pow(2) * keep).sum() / keep.sum().clamp_min(1.0)
    if massive == "none":
        return F.mse_loss(h_s, h_t)
    raise InputError(f"unknown massive-activation handling {massive!r}; choose one of {', '.join(MASSIVE_MODES)}.")


def feature_loss(student_feats: dict, teacher_feats: dict, pairs, massive: str = "normalize",
                 mask_threshold: float = 20.0) -> torch.Tensor:
    """Sum over mapped pairs of the feature distance of both streams (text + image)."""
    total = None
    for s_name, t_name in pairs:
        for h_s, h_t in zip(student_feats[s_name], teacher_feats[t_name]):
            d = feature_distance(h_s, h_t, massive, mask_threshold)
            total = d if total is None else total + d
    if total is None:
        raise InputError("no block pairs to compare; the feature loss needs at least one mapped block.")
    return total


def distillation_loss(v_student: torch.Tensor, v_teacher: torch.Tensor, target: torch.Tensor | None,
                      student_feats: dict, teacher_feats: dict, pairs, weights: DistillWeights = DistillWeights(),
                      loss_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The terms and their weighted sum (``loss``). ``target`` = ``eps - x0`` for L_flow (``None`` skips it);
    ``loss_weight`` is an optional per-sample weight of L_flow (the engine's timestep weighting)."""
    v_s = v_student.float()
    terms: dict[str, torch.Tensor] = {}
    zero = v_s.new_zeros(())
    if target is not None and weights.flow > 0:
        per = (v_s - target.float()).pow(2).mean(dim=tuple(range(1, v_s.ndim)))
        terms["flow"] = (per * loss_weight.float()).mean() if loss_weight is not None else per.mean()
    else:
        terms["flow"] = zero
    terms["out"] = F.mse_loss(v_s, v_teacher.float().detach()) if weights.out > 0 else zero
    if weights.feat > 0 and pairs:
        terms["feat"] = feature_loss(student_feats, teacher_feats, pairs, weights.massive, weights.mask_threshold)
    else:
        terms["feat"] = zero
    terms["loss"] = weights.flow * terms["flow"] + weights.out * terms["out"] + weights.feat * terms["feat"]
    return terms
