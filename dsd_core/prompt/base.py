"""Shared pieces of prompt enhancement: result type, instructions, reply cleaning.

The official DSD code asks a vision-language model two things (see
docs/dsd-reference.md §4):

1. *caption*: describe the (center-cropped 512x512) reference image as a
   text-to-image prompt;
2. *enhance*: rewrite the user's prompt, keeping what it says and taking the
   rest (above all the main subject) from that caption.

The instructions below are our own wording of the same intent. Any change to
their text must bump :data:`INSTRUCTIONS_VERSION`, which is part of the cache
key, so that cached results made with older instructions are not reused.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from PIL import Image

#: Version of the instruction texts below; part of the cache key.
INSTRUCTIONS_VERSION = "1"

#: Side of the square image the models are shown (as in the official code).
REFERENCE_SIZE = 512

CAPTION_INSTRUCTION = (
    "Write a prompt for a text-to-image model that would reproduce this image. "
    "Describe the main subject (the central character, object or asset) in detail, "
    "then its surroundings, its pose, the lighting, the camera angle and the visual style. "
    "Be concise and specific and keep it coherent on its own: a single line of at most 77 tokens. "
    "Reply with the prompt only."
)

ENHANCE_INSTRUCTION = (
    "Here is a short text-to-image prompt: \"{prompt}\". "
    "Here is a detailed description of a reference image: \"{caption}\". "
    "Rewrite the short prompt into a detailed one. Keep every detail the short prompt states, "
    "and take the remaining details, above all the description of the main subject, "
    "from the reference description. "
    "Reply with the rewritten prompt only, as a single line of at most 77 tokens."
)


def build_enhance_instruction(prompt: str, caption: str) -> str:
    """Return the text of the second (enhance) call for ``prompt`` and ``caption``."""
    return ENHANCE_INSTRUCTION.format(prompt=prompt.strip(), caption=caption.strip())


@dataclass(frozen=True)
class EnhanceResult:
    """Outcome of :func:`dsd_core.prompt.enhance_prompt`.

    Attributes:
        prompt: the enhanced prompt, or the original prompt unchanged on fallback.
        enhanced: True when ``prompt`` is an enhancement (fresh or cached).
        caption: the model's caption of the reference image, when available.
        backend: "gemini", "local" or "none".
        warning: one sentence naming why enhancement fell back, else None.
        cached: True when the result came from the cache (no model was called).
    """

    prompt: str
    enhanced: bool
    caption: str | None
    backend: str
    warning: str | None = None
    cached: bool = False


class EnhanceError(Exception):
    """A backend could not enhance; the message is the cause, safe to show and log.

    Backends build the message themselves and must never put a secret in it.
    """


_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


def clean_reply(text: str | None) -> str:
    """Normalise a model reply to one line.

    Like the official code, ``\\n`` and ``\\r`` are deleted (not replaced by
    spaces); other control characters are dropped too. Surrounding whitespace
    and one or more layers of matching surrounding quotes are removed.
    """
    if not text:
        return ""
    text = text.replace("\r", "").replace("\n", "")
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cc")
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def prepare_reference(image: Image.Image, size: int = REFERENCE_SIZE) -> Image.Image:
    """The ``size``² center crop the official code shows the model (see :func:`dsd_core.image.prepare_reference`)."""
    from ..image import prepare_reference as fit

    return fit(image, size, size)
