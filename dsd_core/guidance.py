"""DSD's two-scale "true" guidance (image scale ``s_i``, text scale ``s_t``) on top of FLUX's distilled guidance.

Per step, with x the latents, c_T the prompt, c_0 the empty prompt and c_I the condition latents::

    v_TI = f(x, c_T, c_I)      # the normal pass
    v_0I = f(x, c_0, c_I)      # empty prompt, with the reference
    v_00 = f(x, c_0, 0)        # empty prompt, zero condition (zeros in *packed latent* space)

    v = v_00 + s_i * (v_0I - v_00) + s_t * (v_TI - v_0I)    if s_i > 1 and the step is in the window
    v = v_TI                                                 otherwise

The reference gates the whole branch on ``s_i > 1`` only (so ``s_t`` does nothing while ``s_i <= 1``) and skips
it for the first two steps. The combination is evaluated in the latents' dtype in exactly this order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .options import TRUE_GUIDANCE_START as REFERENCE_START_STEP  # the reference's ``no_cfg_until_timestep = 2``


@dataclass(frozen=True)
class TrueGuidance:
    """Settings of the two-scale true guidance.

    image_scale: ``s_i``; the branch runs only when it is > 1 (reference gate).
    text_scale: ``s_t``; ignored while ``image_scale <= 1``, exactly as in the reference.
    start_step: first step (0-based) that uses the branch; the reference uses 2.
    end_step: first step that no longer uses it (``None`` = to the end; the reference). A window ending early
        is a speed option (fewer 3-pass steps), not reference behaviour.
    """

    image_scale: float = 1.0
    text_scale: float = 1.0
    start_step: int = REFERENCE_START_STEP
    end_step: int | None = None

    def __post_init__(self):
        if self.start_step < 0:
            raise ValueError(f"true guidance start_step must be >= 0, got {self.start_step}")
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(f"true guidance end_step ({self.end_step}) is before start_step ({self.start_step})")

    @property
    def enabled(self) -> bool:
        """Whether the run needs the empty-prompt embeddings at all (reference: ``s_i > 1``)."""
        return self.image_scale > 1.0

    def active(self, step: int) -> bool:
        """Whether step ``step`` (0-based) uses the three-pass combination."""
        if not self.enabled or step < self.start_step:
            return False
        return self.end_step is None or step < self.end_step

    def passes(self, num_steps: int) -> int:
        """Number of transformer passes a run of ``num_steps`` makes (per image batch)."""
        return sum(3 if self.active(i) else 1 for i in range(num_steps))


def combine(v_text_image: torch.Tensor, v_image: torch.Tensor, v_uncond: torch.Tensor,
            image_scale: float, text_scale: float) -> torch.Tensor:
    """``v_00 + s_i * (v_0I - v_00) + s_t * (v_TI - v_0I)``, in the inputs' dtype, in the reference's order."""
    return v_uncond + image_scale * (v_image - v_uncond) + text_scale * (v_text_image - v_image)
