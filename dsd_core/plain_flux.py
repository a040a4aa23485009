"""Plain FLUX.1-dev text-to-image (diffusers' ``FluxPipeline``) as the pack's assembler builds it
(:func:`dsd_core.loading.load_flux_pipeline`): data generation draws its grids with it."""

from __future__ import annotations

from diffusers import FluxPipeline

from .hooks import CallHook


class PlainFluxPipeline(FluxPipeline):
    """diffusers' ``FluxPipeline`` that accepts the assembler's per-call hooks.

    Its ``__call__`` is diffusers' own, so the hooks' per-call points are not run: the memory hook's "free the model
    hooks before the loop" is what diffusers' offload chain does at the end of each call anyway, and text-encoder
    release is refused for plain FLUX (:class:`~dsd_core.sources.FluxBaseSource`). The hooks are kept for inspection.
    """

    def set_call_hook(self, name: str, hook: CallHook | None) -> None:
        hooks = self.__dict__.setdefault("_call_hooks", {})
        if hook is None:
            hooks.pop(name, None)
        else:
            hooks[name] = hook
