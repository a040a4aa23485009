"""Checks on what the user hands in, shared by the command line and the nodes: panel sizes, prompt length, reference
size. Nothing here changes an input; the functions say what will happen to it, so callers can tell the user.

* :data:`PANEL_SIZE` / :func:`check_panel_size` - the one definition of a valid panel side (DSD Image Prep and DSD
  Sampler use both, so a size one node accepts the other accepts too);
* :func:`prompt_token_counts` - how many tokens the prompt has for each text encoder and how many it reads (CLIP-L
  reads 77, T5 ``max_sequence_length``, 512 by default): longer prompts are cut, as in the reference pipeline;
* :func:`reference_upscale` - how much a reference is enlarged to fill a panel (a 1x1 picture is enlarged 512x).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .options import PANEL, PANEL_MAX, PANEL_MIN, PANEL_STEP

#: A panel side (the canvas is ``size x 2*size``): multiples of 16 (VAE 8x times 2x2 packing), 64 to 2048; the
#: node widget spec built from :mod:`dsd_core.options`.
PANEL_SIZE = {"default": PANEL, "min": PANEL_MIN, "max": PANEL_MAX, "step": PANEL_STEP}
#: References enlarged more than this factor to fill a panel are reported (detail is invented, not kept).
UPSCALE_NOTE_FACTOR = 2.0


def check_panel_size(size: int) -> int:
    """``size`` if it is a valid panel side, else :class:`InputError` saying which sizes are."""
    lo, hi, step = PANEL_SIZE["min"], PANEL_SIZE["max"], PANEL_SIZE["step"]
    if not isinstance(size, int) or isinstance(size, bool) or size % step or not lo <= size <= hi:
        near = min(max(lo, round(size / step) * step), hi) if isinstance(size, (int, float)) else PANEL_SIZE["default"]
        raise InputError(f"panel_size {size!r} is not valid: use a multiple of {step} from {lo} to {hi} "
                         f"(e.g. {near}; DSD was trained at 512).")
    return size


@dataclass(frozen=True)
class PromptTokens:
    """Token counts of a prompt (special tokens included) and the number each encoder reads."""

    clip: int
    clip_limit: int
    t5: int
    t5_limit: int

    @property
    def truncated(self) -> bool:
        return self.clip > self.clip_limit or self.t5 > self.t5_limit

    def notes(self) -> list[str]:
        out = []
        if self.t5 > self.t5_limit:
            out.append(f"prompt truncated: it is {self.t5} T5 tokens and T5 reads the first {self.t5_limit}; the rest "
                       f"is ignored. Shorten the prompt.")
        if self.clip > self.clip_limit:
            out.append(f"prompt truncated for CLIP: it is {self.clip} CLIP tokens and CLIP-L reads the first "
                       f"{self.clip_limit} (its pooled summary only; T5 reads up to {self.t5_limit}).")
        return out


def _count(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])


def prompt_token_counts(tokenizer, tokenizer_2, prompt: str, max_sequence_length: int = 512) -> PromptTokens:
    """Count ``prompt``'s CLIP (``tokenizer``) and T5 (``tokenizer_2``) tokens against what FLUX's encoders read."""
    return PromptTokens(clip=_count(tokenizer, prompt), clip_limit=int(tokenizer.model_max_length),
                        t5=_count(tokenizer_2, prompt), t5_limit=int(max_sequence_length))


def reference_upscale(size: tuple[int, int], panel: tuple[int, int], fit: str = "center_crop") -> float:
    """The factor by which a ``(w, h)`` reference is enlarged to fill a ``(w, h)`` panel with ``fit``."""
    (w, h), (pw, ph) = size, panel
    if fit == "pad":
        return min(pw / w, ph / h)
    return max(pw / w, ph / h)  # center_crop fills the panel; stretch enlarges each side on its own


def reference_notes(size: tuple[int, int], panel: tuple[int, int], fit: str = "center_crop") -> list[str]:
    """A note when the reference is enlarged more than :data:`UPSCALE_NOTE_FACTOR` to fill the panel."""
    factor = reference_upscale(size, panel, fit)
    if factor <= UPSCALE_NOTE_FACTOR:
        return []
    return [f"reference upscaled {factor:.1f}x: it is {size[0]}x{size[1]} px and the panel {panel[0]}x{panel[1]}; "
            f"the subject's details are invented, not kept. Use a reference of at least "
            f"{int(min(panel) / UPSCALE_NOTE_FACTOR)} px."]
