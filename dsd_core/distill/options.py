"""The distillation method's options (light: no torch), so the CLI can build its parser without loading the training
stack. The method itself: :mod:`dsd_core.distill.method`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..training.config import _f
from ..training.methods.options import NoiseOptions
from .layout import FEATURE_MAPS, PRESETS

#: How massive activations (a few channels orders of magnitude above the rest) are kept out of the feature loss.
MASSIVE_MODES = ("normalize", "mask", "none")


@dataclass
class DistillOptions(NoiseOptions):
    """Distillation: the student, the objective and how inputs are drawn."""

    student: str = _f("", "student transformer folder from `distill prune` (empty: build it from the teacher with "
                          "--preset / --double / --single)")
    preset: str = _f("half", "student size when built here: " + ", ".join(PRESETS) + " (fraction of the blocks kept, "
                             "evenly spaced)", tuple(PRESETS))
    double: str = _f("", "kept double-stream blocks, e.g. '0-4,9' (overrides --preset)")
    single: str = _f("", "kept single-stream blocks, e.g. '0-9,20' (overrides --preset)")
    lambda_flow: float = _f(1.0, "weight of the flow-matching loss on the data")
    lambda_out: float = _f(0.5, "weight of the output distillation loss |v_S - v_T|^2 (BK-SDM: 0.5 as in "
                                "segmind/distill-sd; 1.0 official)")
    lambda_feat: float = _f(0.5, "weight of the feature distillation loss over mapped blocks")
    feature_map: str = _f("segment_end", "teacher block each student block is compared with: segment_end (the last "
                                         "teacher block it replaces) or same (the block it was copied from)",
                          FEATURE_MAPS)
    massive: str = _f("normalize", "massive-activation handling in the feature loss: normalize (per-channel by the "
                                   "teacher's RMS), mask (leave out outliers, TinyFusion), none", MASSIVE_MODES)
    mask_threshold: float = _f(20.0, "massive=mask: leave out teacher values above this many times the median "
                                     "magnitude")
    guidance_min: float = _f(3.5, "lowest distilled guidance fed to teacher and student (DSD samples at 3.5)")
    guidance_max: float = _f(3.5, "highest distilled guidance (e.g. 2-5 to cover other settings)")
    branch_text_image: float = _f(0.8, "share of inputs with prompt + reference (the pass used without true "
                                       "guidance)")
    branch_image: float = _f(0.1, "share with empty prompt + reference (true guidance's image-only pass)")
    branch_uncond: float = _f(0.1, "share with empty prompt + zero condition (true guidance's unconditional pass)")

    def __post_init__(self):
        super().__post_init__()
        branches = (self.branch_text_image, self.branch_image, self.branch_uncond)
        if min(branches) < 0 or sum(branches) <= 0:
            raise InputError("branch_text_image, branch_image and branch_uncond must be non-negative shares with a "
                             "positive sum.")
        if self.guidance_min > self.guidance_max:
            raise InputError(f"guidance_min {self.guidance_min} is above guidance_max {self.guidance_max}.")
        if min(self.lambda_flow, self.lambda_out, self.lambda_feat) < 0:
            raise InputError("distillation loss weights (lambda_flow, lambda_out, lambda_feat) must not be negative.")
        if self.mask_threshold <= 0:
            raise InputError(f"mask_threshold must be positive, got {self.mask_threshold}.")
