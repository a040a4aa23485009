"""Per-call hooks: how behaviour chosen at load time (memory modes, speed options) reaches each pipeline call.

A loader installs hooks by name with :meth:`dsd_core.DSDPipeline.set_call_hook`; the pipeline runs every installed
hook at four fixed points of ``__call__`` without knowing what they do:

1. :meth:`CallHook.guidance` -- may change the true-guidance schedule of this call (e.g. the fast mode's window);
2. :meth:`CallHook.encode` -- wraps the encoding of one prompt (e.g. keeps encoded prompts once the text encoders
   are released);
3. :meth:`CallHook.before_denoising` -- runs between encoding and the sampling loop (e.g. releases the text
   encoders, sends idle components back to the CPU, resets a step cache);
4. :meth:`CallHook.branch` -- a context around every transformer pass of a guidance branch (``cond``, ``uncond``,
   ``image``, or ``batch`` for the batched passes; e.g. a step cache keeps one state per branch).

The base class does nothing at each point, so a hook overrides only what it needs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence


class CallHook:
    """Behaviour run by :class:`~dsd_core.DSDPipeline` at fixed points of each call (see the module docstring)."""

    def guidance(self, guidance, num_inference_steps: int):
        """The :class:`~dsd_core.guidance.TrueGuidance` to use for this call (default: unchanged)."""
        return guidance

    def encode(self, key: tuple, compute: Callable[[], tuple]) -> tuple:
        """Encode one prompt: ``key`` is ``(prompt, max_sequence_length)``, ``compute()`` runs the text encoders."""
        return compute()

    def before_denoising(self, pipe, prompts: Sequence[str], encode: Callable[[str], tuple]) -> None:
        """Between encoding and the loop; ``encode(prompt)`` encodes one of the call's ``prompts`` (cached by
        :meth:`encode` hooks), e.g. to keep the negative prompt for later calls."""

    def branch(self, pipe, name: str) -> ContextManager:
        """A context entered around each transformer pass of guidance branch ``name``."""
        return contextlib.nullcontext()
