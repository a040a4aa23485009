"""Every option list and default of DSD, in one place: the nodes, the CLI and the workflow generator import them.

This module imports nothing heavy (no torch at import time), so building a CLI parser or a node's input list stays
fast. The defaults are the official DSD settings (``generate.py`` of primecai/diffusion-self-distillation).
"""

from __future__ import annotations

from .errors import InputError

# ---------------------------------------------------------------------------------------------- sampling defaults
#: Euler steps of the reference.
STEPS = 28
#: FLUX distilled guidance of the reference.
GUIDANCE = 3.5
#: DSD true guidance scales: 1.0 = off (the reference's default; its demo uses image guidance 1.5).
IMAGE_GUIDANCE = 1.0
TEXT_GUIDANCE = 1.0
#: The reference skips true guidance for steps 0 and 1 (``no_cfg_until_timestep = 2``).
TRUE_GUIDANCE_START = 2
#: LoRA multiplier (the reference loads the LoRA at 1.0).
LORA_SCALE = 1.0
#: Side of one panel DSD was trained at; the canvas is PANEL x 2*PANEL.
PANEL = 512
#: Above this panel side DSD is known to distort (the pipeline warns).
PANEL_WARN = 768
#: Panel sides DSD Image Prep and the sampler accept (multiples of the canvas multiple, 16).
PANEL_MIN, PANEL_MAX, PANEL_STEP = 64, 2048, 16
#: T5 tokens of the prompt (FLUX.1-dev).
MAX_SEQUENCE_LENGTH = 512

# ---------------------------------------------------------------------------------------------- choices
#: How the posterior of the condition canvas is used.
CONDITION_SAMPLING = {
    "sample": "a VAE posterior sample (the reference)",
    "mode": "the posterior mean",
}
#: How a reference that is not panel-sized is fitted into its panel.
FIT_MODES = {
    "center_crop": "crop the centre square, then resize (the reference)",
    "pad": "keep the whole picture, fill the rest",
    "stretch": "resize to the panel, ignoring the aspect ratio",
}
#: Pillow resize filters by name (bicubic is Pillow's default and the reference's).
RESAMPLE_FILTERS = ("bicubic", "lanczos", "bilinear", "nearest", "box", "hamming")
#: Prompt enhancement backends (``none`` = off).
ENHANCE_BACKENDS = ("gemini", "local", "none")

#: Compute dtypes by name; ``auto`` = bfloat16 on an accelerator (the reference), float32 on the CPU.
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_CHOICES = ("auto",) + DTYPES
DTYPE_HELP = "auto: bfloat16 on a GPU (the reference), float32 on the CPU (bfloat16 is slow there)"
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
#: Devices by name; default: cuda if available, else mps, else cpu.
DEVICES = ("cuda", "mps", "cpu")


def default_device() -> str:
    """cuda if available, else mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_dtype(dtype):
    """``torch.dtype`` from a name (``bfloat16``/``bf16``, ``float16``/``fp16``, ``float32``/``fp32``, also with a
    ``torch.`` prefix) or a ``torch.dtype``; ``None`` or ``"auto"`` -> ``None`` (chosen by device when loading)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return None
        key = _DTYPE_ALIASES.get(key, key)
        if key in DTYPES:
            return getattr(torch, key)
    raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}.")


def dtype_name(dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``, ``"auto"`` for None."""
    return "auto" if dtype is None else str(dtype).removeprefix("torch.")


def check_choice(what: str, value, choices) -> None:
    """One-line :class:`InputError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; use one of {', '.join(map(str, choices))}.")
