"""Guards inside a run: non-finite values stop it (never a black image), and one pipeline runs one call at a time.

* :func:`check_finite` / :func:`check_step` -- NaN or infinity in the condition latents, a velocity, the latents
  after a step, or the decoded canvas raises :class:`~dsd_core.errors.NonFiniteError` naming the stage and its likely
  cause. The arguments themselves are checked before anything runs (:mod:`dsd_core.validation`), so what is left are
  numeric overflows (float16), damaged weights and extreme scales.
* :func:`serialized` -- a decorator for :meth:`DSDPipeline.__call__`: calls from several threads run one after the
  other (the scheduler, the LoRA scale and the step caches are per-pipeline state); a call from inside a running call
  on the same thread (a callback calling the pipeline) is refused with :class:`~dsd_core.errors.ConcurrentUseError`.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref

import torch

from .errors import ConcurrentUseError, NonFiniteError

logger = logging.getLogger(__name__)

_DTYPE_HINT = ("float16 overflows in FLUX (use bfloat16 or float32: --dtype / dtype=)")
#: stage -> likely causes, most likely first.
CAUSES = {
    "condition": f"the VAE encoder overflowed or its weights are damaged: {_DTYPE_HINT}, or re-download the VAE",
    "velocity": (f"the transformer's prediction overflowed: {_DTYPE_HINT}; or an extreme lora_scale / guidance; or "
                 "damaged transformer/LoRA weights (re-download them)"),
    "latents": (f"the sampler step overflowed: {_DTYPE_HINT}; or an extreme lora_scale / guidance; or damaged "
                "weights"),
    "decoded": f"the VAE decoder overflowed: {_DTYPE_HINT}; or damaged VAE weights (re-download the VAE)",
}


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


def check_finite(tensor: torch.Tensor, stage: str, where: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or infinity; ``stage`` is a key of :data:`CAUSES`."""
    if is_finite(tensor):
        return
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
    dtype = str(tensor.dtype).removeprefix("torch.")
    raise NonFiniteError(f"the {stage} {where + ' ' if where else ''}became {kind} ({dtype}); the run was stopped "
                         f"instead of returning a broken image. Likely cause: {CAUSES.get(stage, 'numeric overflow')}.")


def check_step(latents: torch.Tensor, velocity: torch.Tensor | None, step: int, total: int) -> None:
    """After sampler step ``step`` (0-based): the velocity first (the usual origin), then the new latents."""
    if is_finite(latents):
        return
    where = f"at step {step + 1} of {total}"
    if velocity is not None:
        check_finite(velocity, "velocity", where)
    check_finite(latents, "latents", where)


# ---------------------------------------------------------------------------------------------- concurrency
_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_owners: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _lock_for(obj) -> threading.Lock:
    with _registry_lock:
        lock = _locks.get(obj)
        if lock is None:
            lock = _locks[obj] = threading.Lock()
        return lock


def serialized(method):
    """Run ``method`` for one object at a time: other threads wait, re-entry from the same thread is refused."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = _lock_for(self)
        me = threading.get_ident()
        if _owners.get(self) == me:
            raise ConcurrentUseError(
                f"{type(self).__name__} was called from inside its own running call (e.g. from a step callback); a "
                "pipeline runs one generation at a time. Call it again after the current call returns."
            )
        if not lock.acquire(blocking=False):
            logger.info("%s is busy in another thread; waiting for that generation to finish", type(self).__name__)
            lock.acquire()
        _owners[self] = me
        try:
            return method(self, *args, **kwargs)
        finally:
            _owners.pop(self, None)
            lock.release()

    return wrapper
