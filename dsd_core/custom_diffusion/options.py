"""Custom Diffusion's options and option lists (light: no torch), so the CLI can build its parser without loading
the training stack. The method: :mod:`dsd_core.custom_diffusion.method`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..training.config import _f, check_choices

#: What is tuned: FLUX.1-dev text-to-image, or the DSD model on 1x2 canvases.
MODES = ("flux", "dsd")
#: Tuned layers by preset (module-name suffixes of the double-stream blocks' text side).
PRESETS = {
    "kv": ("add_k_proj", "add_v_proj"),
    "kv+q+out": ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}
#: How a delta is stored: low rank, or a full matrix.
FORMS = ("lora", "full")
#: Noise-level sampling of the objective.
SIGMA_SCHEMES = ("logit_normal", "uniform")


@dataclass
class CustomDiffusionOptions:
    """Custom Diffusion: concepts, tuned parameters, modifier tokens, prior preservation, objective."""

    mode: str = _f("dsd", "flux: tune FLUX.1-dev text-to-image; dsd: tune the DSD model (1x2 canvases)", MODES)
    instance_dir: str = _f("", "folder of 4-20 images of the concept (one concept; or use concepts_list)")
    instance_prompt: str = _f("photo of a <new1> cat", "prompt naming the concept: modifier token, then the class "
                                                       "word")
    class_prompt: str = _f("", "prompt of the class for prior preservation (default: the instance prompt without the "
                               "token)")
    class_dir: str = _f("", "folder of class images (+ optional same-name .txt captions); empty: generate them")
    concepts_list: str = _f("", "JSON file: a list of {instance_dir, instance_prompt, class_prompt, class_dir} for "
                                "joint multi-concept training (overrides the single-concept options)")
    preset: str = _f("kv", "tuned layers: kv (double-stream add_k/add_v) or kv+q+out (+ add_q, to_add_out)",
                     tuple(PRESETS))
    form: str = _f("lora", "delta form: lora (low rank) or full", FORMS)
    rank: int = _f(16, "LoRA rank of the deltas")
    alpha: float = _f(0.0, "LoRA alpha (0: equal to the rank, scale 1)")
    context_embedder: bool = _f(False, "also tune context_embedder (T5 -> transformer projection)")
    single_text_kv: bool = _f(False, "also tune single-stream to_k/to_v on the text rows only")
    token_encoders: str = _f("t5", "text encoders that get the modifier token: t5, or t5,clip")
    train_tokens: bool = _f(True, "train the modifier-token embeddings (CD: yes)")
    token_lr: float = _f(0.0, "learning rate of the token embeddings (0: the same as the deltas)")
    token_weight_decay: float = _f(-1.0, "weight decay of the token embeddings (-1: the same as weight_decay)")
    with_prior_preservation: bool = _f(True, "prior-preservation loss with class images (CD: yes)")
    prior_loss_weight: float = _f(1.0, "weight of the class (prior) term")
    num_class_images: int = _f(200, "class images to generate (CD: 200)")
    class_steps: int = _f(28, "denoising steps of generated class images")
    class_guidance: float = _f(3.5, "distilled guidance of generated class images")
    class_seed: int = _f(0, "seed of class image k is class_seed + k")
    class_cache: str = _f("", "folder of generated class images (default: OUTPUT/class_images); shared by runs")
    aug: bool = _f(True, "CD's far-away / close-up resize augmentation with the masked loss (CD --noaug: false)")
    hflip: bool = _f(True, "random horizontal flips")
    scale_lr: bool = _f(False, "CD's --scale_lr: lr x batch x accumulation x processes (x2 with prior)")
    sigma_sampling: str = _f("logit_normal", "noise-level sampling", SIGMA_SCHEMES)
    guidance_value: float = _f(1.0, "distilled guidance fed while training (FLUX.1-dev trainers: 1.0)")
    max_sequence_length: int = _f(512, "T5 tokens of a prompt (generation: 512)")
    validation_prompt: str = _f("", "prompt of validation images (empty: none)")
    validation_seed: int = _f(0, "seed of the validation images")
    delta_name: str = _f("concept.safetensors", "file name of the exported concept delta inside OUTPUT")

    def __post_init__(self):
        check_choices(self)
        if self.rank < 1:
            raise InputError(f"rank must be at least 1, got {self.rank}.")
        for enc in self.encoders():
            if enc not in ("t5", "clip"):
                raise InputError(f"token_encoders: unknown encoder {enc!r}; use t5 or t5,clip.")
        if "t5" not in self.encoders():
            raise InputError("token_encoders must include t5 (the prompt's main encoder).")

    def encoders(self) -> list[str]:
        return [e.strip() for e in self.token_encoders.split(",") if e.strip()]
