"""Generating with concept deltas: apply them for the duration of a call, leave the loaded model unchanged.

:func:`concepts_applied` attaches concept files to a pipeline inside a ``with`` block. :class:`ConceptPipeline`
wraps a pipeline so that every call runs with its concepts applied and checked against the prompt, and the shared
model is back to its own weights afterwards -- what an application holding one loaded model for several graphs
(ComfyUI) needs: a sampler given the plain model never sees another branch's concept.
"""

from __future__ import annotations

import contextlib
import threading

from .delta_file import ConceptFile, check_prompt_tokens

_LOCK = threading.RLock()


@contextlib.contextmanager
def concepts_applied(pipe, concepts, scale: float = 1.0, check: bool = True):
    """Apply concept files (paths or :class:`ConceptFile`, or ``(concept, scale)`` pairs) to ``pipe`` inside the
    block; yields the handles."""
    applied = []
    with _LOCK:
        try:
            for concept in concepts:
                concept, strength = concept if isinstance(concept, tuple) else (concept, scale)
                concept = ConceptFile.load(concept) if not isinstance(concept, ConceptFile) else concept
                applied.append(concept.apply(pipe, strength, check))
            yield applied
        finally:
            for handle in reversed(applied):
                handle.remove()


class ConceptPipeline:
    """A pipeline proxy: calls run with ``concepts`` applied (after checking the prompt's tokens); everything else
    is the wrapped pipeline's."""

    def __init__(self, pipe, concepts: list, scale: float = 1.0, check: bool = True):
        self.__dict__.update(_pipe=pipe, _concepts=list(concepts), _scale=scale, _check=check)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        from .delta_file import is_dsd

        position = 1 if is_dsd(self._pipe) else 0  # DSD: (image, prompt, ...); FLUX: (prompt, ...)
        prompt = kwargs.get("prompt", args[position] if len(args) > position else "")
        with concepts_applied(self._pipe, self._concepts, self._scale, self._check):
            check_prompt_tokens(self._pipe, prompt if isinstance(prompt, str) else "")
            return self._pipe(*args, **kwargs)


class ConceptModel:
    """A model handle (like :class:`dsd_core.model_store.LazyPipeline`) whose pipeline has concepts applied.

    ``concepts``: :class:`ConceptFile` objects (or paths), or ``(concept, scale)`` pairs."""

    def __init__(self, inner, concepts: list, scale: float = 1.0, check: bool = True):
        self.inner, self.concepts, self.scale, self.check = inner, list(concepts), scale, check
        self.spec = inner.spec

    @property
    def loaded(self) -> bool:
        return self.inner.loaded

    def get(self):
        pipe = self.inner.get()
        return ConceptPipeline(pipe, self.concepts, self.scale, self.check)

    def release(self) -> None:
        self.inner.release()
