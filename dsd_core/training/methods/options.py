"""The DSD method's options and option lists (light: no torch), so the CLI can build its parser without loading the
training stack. The method itself: :mod:`dsd_core.training.methods.dsd_lora`."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InputError
from ..config import _f

ADAPTER = "dsd"
#: LoRA target presets (module-name suffixes of the diffusers FLUX transformer).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGET_PRESETS = {
    "attention": ATTENTION,
    "attention+ffn": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                  "proj_mlp", "proj_out"],
}
TIMESTEP_SAMPLING = ("flux_shift", "logit_normal", "sigmoid", "shift", "uniform")
GUIDANCE_MODES = ("constant", "random-range")
LOSS_REGIONS = ("both", "target")


@dataclass
class NoiseOptions:
    """Inputs drawn as DSD training draws them (shared by the DSD LoRA and distillation methods)."""

    condition_sampling: str = _f("sample", "condition latents: sample (a VAE posterior sample, as generation) or "
                                           "mode (the posterior mean)", ("sample", "mode"))
    timestep_sampling: str = _f("flux_shift", "how noise levels are drawn (see dsd_core/training/methods/dsd_lora.py)",
                                TIMESTEP_SAMPLING)
    sigmoid_scale: float = _f(1.0, "scale of the normal draw for sigmoid / logit-normal sampling")
    logit_mean: float = _f(0.0, "mean of the logit-normal draw")
    timestep_shift: float = _f(3.0, "fixed shift for timestep_sampling=shift")
    max_sequence_length: int = _f(512, "T5 tokens of the caption (generation: 512)")
    validation_seed: int = _f(0, "seed of the validation images")
    validation_guidance: float = _f(3.5, "distilled guidance of the validation images (DSD: 3.5)")

    def __post_init__(self):
        from ..config import check_choices

        check_choices(self)


@dataclass
class DSDLoRAOptions(NoiseOptions):
    """DSD method: LoRA, c_embedder and the objective."""

    rank: int = _f(32, "LoRA rank (paper: 512 on 8x H100; 32 fits a 24 GB GPU with fp8 weights)")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / rank); stored in the LoRA file's metadata")
    lora_targets: str = _f("attention", "LoRA target modules: a preset (" + ", ".join(LORA_TARGET_PRESETS)
                           + ") or a comma-separated list of module-name suffixes")
    train_c_embedder: bool = _f(True, "train the condition layer c_embedder fully (DSD: yes)")
    c_embedder_lr: float = _f(0.0, "learning rate of c_embedder (0: the same as --lr)")
    condition_dropout: float = _f(0.1, "probability of a zero condition (teaches the unconditional branch of true "
                                       "image guidance)")
    caption_dropout: float = _f(0.1, "probability of the empty caption (teaches true text guidance's contrast)")
    guidance_mode: str = _f("constant", "distilled-guidance input while training", GUIDANCE_MODES)
    guidance_value: float = _f(1.0, "guidance for guidance_mode=constant (SimpleTuner / kohya: 1.0)")
    guidance_min: float = _f(1.0, "lower bound for guidance_mode=random-range")
    guidance_max: float = _f(4.0, "upper bound for guidance_mode=random-range")
    loss_region: str = _f("both", "both: flow matching over the whole canvas (paper); target: right half only",
                          LOSS_REGIONS)
    export_full_transformer: bool = _f(False, "write a self-contained transformer/ (24 GB at full size) instead of "
                                              "c_embedder + a link to the base transformer")

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise InputError(f"rank must be at least 1, got {self.rank}.")
        for name in ("condition_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")

    def targets(self) -> list[str]:
        if self.lora_targets in LORA_TARGET_PRESETS:
            return list(LORA_TARGET_PRESETS[self.lora_targets])
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]
