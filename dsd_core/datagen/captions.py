"""Captions of kept pairs: a target description (the training caption) and, optionally, an instruction.

The paper captions pairs "either as a Target Description or as InstructPix2Pix-style instructions" (dsd-reference.md
§5). Backends:

* ``gemini`` / ``local``: the target panel is described with the prompt enhancer's own caption instruction
  (:data:`dsd_core.prompt.CAPTION_INSTRUCTION`, one line, at most 77 tokens: the prompt style DSD is used with); the
  instruction from both panels with :data:`INSTRUCTION_CAPTION`;
* ``prompt``: no model: the grid prompt's text for that panel ("<subject>, <scene>") and "show it <scene>".

A model failure falls back to the ``prompt`` captions for that panel, and ``caption_source`` records it.
"""

from __future__ import annotations

import logging

from .grid_prompts import GridPrompt

logger = logging.getLogger(__name__)

INSTRUCTION_CAPTION = (
    "Image 1 and image 2 show the same subject. Write one short instruction in the imperative that would turn image "
    "1 into image 2 while keeping the subject, for example 'put it on a beach at sunset'. Reply with the instruction "
    "only, in one line."
)


def prompt_caption(grid: GridPrompt, target: int) -> str:
    return grid.panel_caption(target)


def prompt_instruction(grid: GridPrompt, target: int) -> str:
    return f"show it {grid.panels[target]}"


class Captioner:
    """Captions panels of one grid; ``client`` None uses the grid prompt's text (backend ``prompt``)."""

    def __init__(self, client=None, instructions: bool = False, backend: str = "prompt"):
        self.client = client
        self.instructions = instructions
        self.backend = backend if client is not None else "prompt"

    def target_caption(self, grid: GridPrompt, target: int, image) -> tuple[str, str]:
        """(caption, source) of panel ``target``."""
        from ..prompt import CAPTION_INSTRUCTION, EnhanceError

        if self.client is None:
            return prompt_caption(grid, target), "prompt"
        try:
            return self.client.ask(CAPTION_INSTRUCTION, [image], step="caption"), self.backend
        except EnhanceError as e:
            logger.warning("caption of grid %s panel %d from the prompt (%s failed: %s)", grid.id, target,
                           self.backend, e)
            return prompt_caption(grid, target), f"prompt (fallback: {e})"

    def instruction(self, grid: GridPrompt, reference: int, target: int, ref_image, target_image) -> str:
        from ..prompt import EnhanceError

        if self.client is None:
            return prompt_instruction(grid, target)
        try:
            return self.client.ask(INSTRUCTION_CAPTION, [ref_image, target_image], step="instruction caption")
        except EnhanceError as e:
            logger.warning("instruction of grid %s pair %d->%d from the prompt (%s failed: %s)", grid.id, reference,
                           target, self.backend, e)
            return prompt_instruction(grid, target)
