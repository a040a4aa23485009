"""Speed options of the DSD pipeline: ``torch.compile``, the attention backend, and an opt-in fast mode.

Everything is off by default (exact mode = the reference's numerics). :class:`SpeedConfig` collects the switches;
:func:`apply_speed` installs them on a pipeline, and :meth:`SpeedConfig.call_kwargs` gives the per-call part::

    from dsd_core.speed import SpeedConfig, apply_speed
    speed = SpeedConfig.fast()                        # or SpeedConfig(compile="regional", attention_backend=...)
    apply_speed(pipe, speed)
    out = pipe(image, prompt, num_inference_steps=28, image_guidance_scale=2.0, **speed.call_kwargs(28))

* **compile**: ``"regional"`` compiles each repeated transformer block once (diffusers ``compile_repeated_blocks``:
  the 19 double and 38 single blocks share two compiled graphs, so compiling takes seconds, not minutes);
  ``"full"`` compiles the whole transformer (``nn.Module.compile``).
* **attention_backend**: one of diffusers' attention backends (``transformer.set_attention_backend``), checked
  against the installed packages (flash-attn, sageattention, xformers, ``kernels`` for the ``*_hub`` ones, which
  download their kernel on first use).
* **fast mode** -- lossy, measured against exact mode in ``benchmarks/bench_fast_mode.py``:
  - ``first_block_cache``: diffusers' First Block Cache: when the first block's residual changed by less than the
    threshold (relative L1) since the last full pass *of the same guidance branch*, the remaining blocks are skipped
    and their cached residual reused. Each true-guidance branch (``cond``, ``uncond``, ``image``; ``batch`` when
    batched) has its own state through diffusers' ``cache_context``, set by :class:`~dsd_core.DSDPipeline`.
  - ``true_guidance_end``: stop DSD's three-pass true guidance after this fraction of the steps (the pipeline's
    ``true_guidance_end_step``); later steps take one pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import DSDError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "regional", "full")


@dataclass(frozen=True)
class SpeedConfig:
    """Speed switches; the defaults are exact mode (nothing changes)."""

    compile: str = field(default="off", metadata={"help": (
        "torch.compile: off, regional (each repeated block once; fast to compile) or full")})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend (inductor, eager, ...)"})
    compile_mode: str | None = field(default=None, metadata={"help": (
        "torch.compile mode, e.g. max-autotune-no-cudagraphs (None: the default)")})
    attention_backend: str | None = field(default=None, metadata={"help": (
        "diffusers attention backend (None: torch SDPA, the default); see attention_backends()")})
    first_block_cache: float | None = field(default=None, metadata={"help": (
        "First Block Cache threshold (lossy; e.g. 0.08); None: off")})
    true_guidance_end: float | None = field(default=None, metadata={"help": (
        "stop true guidance after this fraction of the steps (lossy; e.g. 0.6); None: to the end (reference)")})

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise DSDError(f"unknown compile mode {self.compile!r}; use one of {', '.join(COMPILE_MODES)}.")
        if self.first_block_cache is not None and not 0 <= float(self.first_block_cache) < 1:
            raise DSDError(f"first_block_cache is a threshold in [0, 1) (e.g. 0.08), got {self.first_block_cache!r}.")
        if self.true_guidance_end is not None and not 0 < float(self.true_guidance_end) <= 1:
            raise DSDError(f"true_guidance_end is a fraction of the steps in (0, 1], got {self.true_guidance_end!r}.")
        if self.attention_backend is not None:
            object.__setattr__(self, "attention_backend", check_attention_backend(self.attention_backend,
                                                                                  require_installed=False))

    @classmethod
    def exact(cls) -> "SpeedConfig":
        return cls()

    @classmethod
    def fast(cls, **changes) -> "SpeedConfig":
        """The fast mode: First Block Cache at 0.08, per guidance branch. The true-guidance window is a separate,
        stronger knob (``true_guidance_end``; e.g. ``SpeedConfig.fast(true_guidance_end=0.6)``): it changes the
        trajectory much more (see benchmarks/bench_fast_mode.py) and late steps form the subject's details."""
        return cls(**{"first_block_cache": FAST_CACHE_THRESHOLD, **changes})

    @property
    def is_exact(self) -> bool:
        """No lossy option is on (compile and attention backends change only float rounding)."""
        return self.first_block_cache is None and self.true_guidance_end is None

    def call_kwargs(self, num_inference_steps: int) -> dict:
        """Per-call arguments of :class:`~dsd_core.DSDPipeline` for this config (the true-guidance window)."""
        if self.true_guidance_end is None:
            return {}
        return {"true_guidance_end_step": true_guidance_end_step(self.true_guidance_end, num_inference_steps)}


#: Fast-mode threshold (ParaAttention/diffusers suggest ~0.08 for FLUX.1-dev as nearly lossless; see the benchmark).
FAST_CACHE_THRESHOLD = 0.08


def true_guidance_end_step(fraction: float, num_inference_steps: int) -> int:
    """First step without true guidance when it stops after ``fraction`` of ``num_inference_steps``."""
    return max(1, round(float(fraction) * num_inference_steps))


# ---------------------------------------------------------------------------------------------- attention
def attention_backends() -> list[str]:
    """All attention backend names diffusers knows (installed or not)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def usable_attention_backends() -> list[str]:
    """The backends whose packages are installed here (``*_hub`` ones still download a kernel on first use)."""
    return [b for b in attention_backends() if _requirement_error(b) is None]


def _requirement_error(name: str) -> str | None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError, ValueError) as e:
        return str(e).strip().splitlines()[0]
    return None


def check_attention_backend(name: str, require_installed: bool = True) -> str:
    """The normalised backend name; a one-line :class:`DSDError` if unknown or (optionally) not installed."""
    key = str(name).strip().lower()
    names = attention_backends()
    if key not in names:
        raise DSDError(f"unknown attention backend {name!r}; use one of {', '.join(names)} "
                       f"(installed here: {', '.join(usable_attention_backends())}).")
    if require_installed:
        problem = _requirement_error(key)
        if problem is not None:
            raise DSDError(f"attention backend {key!r} cannot be used here: {problem} Installed here: "
                           f"{', '.join(usable_attention_backends())}.")
    return key


def set_attention_backend(transformer, name: str | None) -> None:
    """Route every attention of ``transformer`` through backend ``name`` (``None``: back to torch SDPA)."""
    if name is None:
        if hasattr(transformer, "reset_attention_backend"):
            transformer.reset_attention_backend()
        return
    transformer.set_attention_backend(check_attention_backend(name))


# ---------------------------------------------------------------------------------------------- compile
def compile_transformer(transformer, mode: str = "regional", backend: str = "inductor",
                        compile_mode: str | None = None) -> None:
    """``torch.compile`` the transformer in place: ``regional`` (repeated blocks) or ``full``."""
    if mode == "off":
        return
    kwargs = {"backend": backend}
    if compile_mode is not None:
        kwargs["mode"] = compile_mode
    if mode == "regional":
        if not getattr(transformer, "_repeated_blocks", None) or not hasattr(transformer, "compile_repeated_blocks"):
            raise DSDError("regional compile needs diffusers' compile_repeated_blocks (diffusers >= 0.35); use "
                           "compile='full'.")
        transformer.compile_repeated_blocks(**kwargs)
    elif mode == "full":
        transformer.compile(**kwargs)
    else:
        raise DSDError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}.")


# ---------------------------------------------------------------------------------------------- step cache
def enable_first_block_cache(transformer, threshold: float) -> None:
    """diffusers' First Block Cache on ``transformer`` (state per guidance branch, see the module docstring)."""
    from diffusers.hooks import FirstBlockCacheConfig

    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=float(threshold)))


def disable_step_cache(transformer) -> None:
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()


# ---------------------------------------------------------------------------------------------- all
SPEED_PRESETS = ("exact", "fast")


def resolve_speed(speed=None) -> SpeedConfig:
    """A :class:`SpeedConfig` from ``None``/``"exact"``, ``"fast"``, a dict of switches, or a config."""
    if speed is None or speed == "exact":
        return SpeedConfig()
    if speed == "fast":
        return SpeedConfig.fast()
    if isinstance(speed, SpeedConfig):
        return speed
    if isinstance(speed, dict):
        try:
            return SpeedConfig(**speed)
        except TypeError as e:
            raise DSDError(f"invalid speed settings {speed!r}: {e}") from None
    raise DSDError(f"speed must be 'exact', 'fast', a SpeedConfig or a dict, got {speed!r}.")


def apply_speed(pipe, config: SpeedConfig | None = None) -> SpeedConfig:
    """Install ``config`` on ``pipe`` (a :class:`~dsd_core.DSDPipeline`): attention backend, step cache, compile.

    Compile comes last so it sees the other hooks. Returns the config (also kept as ``pipe.speed_config``).
    """
    config = config or SpeedConfig()
    transformer = pipe.transformer
    if config.attention_backend is not None:
        set_attention_backend(transformer, config.attention_backend)
    if config.first_block_cache is not None:
        enable_first_block_cache(transformer, config.first_block_cache)
        if config.compile != "off":
            logger.warning("First Block Cache with torch.compile: the cache decision breaks the graph once per "
                           "pass; expect a smaller gain from compile.")
    compile_transformer(transformer, config.compile, config.compile_backend, config.compile_mode)
    pipe.speed_config = config
    return config


def reset_compile_cache() -> None:
    """Forget compiled graphs (e.g. between benchmarks)."""
    torch._dynamo.reset()
