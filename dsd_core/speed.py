"""Speed options of the DSD pipeline: ``torch.compile``, the attention backend, and an opt-in fast mode.

Everything is off by default (exact mode = the reference's numerics). :class:`SpeedConfig` collects the switches;
:func:`apply_speed` installs them on a pipeline (``load_pipeline(speed=...)`` does it), the per-call part (the
guidance window, the step cache's state per guidance branch) as the pipeline's ``"speed"`` hook::

    from dsd_core.speed import SpeedConfig
    pipe = load_pipeline(..., speed=SpeedConfig.fast())   # or SpeedConfig(compile="regional", attention_backend=...)

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

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field

from .errors import DSDError
from .hooks import CallHook

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
    def from_name(cls, name: str) -> "SpeedConfig":
        """The named mode of :data:`SPEED_MODES` (``exact`` or ``fast``): what a UI widget or a CLI flag holds."""
        key = str(name).strip().lower()
        if key not in SPEED_MODES:
            raise DSDError(f"unknown speed mode {name!r}; use one of {', '.join(SPEED_MODES)} (or a SpeedConfig).")
        return cls.fast() if key == "fast" else cls()

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

    @staticmethod
    def help() -> dict[str, str]:
        """``{field: help text}`` for CLIs and UIs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(SpeedConfig)}


#: The named speed modes (UI widgets, CLI): name -> what it does.
SPEED_MODES = {
    "exact": "the reference's numerics (default)",
    "fast": "First Block Cache: skips the rest of the transformer on steps whose first block changed little "
            "(slightly lossy)",
}

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
    from .diffusers_compat import attention_backend_problem

    return attention_backend_problem(name)


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
def check_speed(speed) -> SpeedConfig:
    """``speed`` itself if it is a :class:`SpeedConfig`, ``SpeedConfig()`` (exact) for ``None``; anything else is a
    one-line error that shows how to make one."""
    if speed is None:
        return SpeedConfig()
    if isinstance(speed, SpeedConfig):
        return speed
    hint = f"SpeedConfig.from_name({speed!r})" if isinstance(speed, str) else "SpeedConfig(...)"
    raise DSDError(f"speed must be a dsd_core.speed.SpeedConfig or None, got {type(speed).__name__} {speed!r}; use "
                   f"{hint} (modes: {', '.join(SPEED_MODES)}).")


def apply_speed(pipe, config: SpeedConfig | None = None) -> SpeedConfig:
    """Install ``config`` on ``pipe`` (a :class:`~dsd_core.DSDPipeline`): attention backend, step cache, compile,
    and the per-call part as the pipeline's ``"speed"`` hook (:class:`SpeedHook`). Returns the config.

    Compile comes last so it sees the other hooks.
    """
    config = check_speed(config)
    transformer = pipe.transformer
    if config.attention_backend is not None:
        set_attention_backend(transformer, config.attention_backend)
    if config.first_block_cache is not None:
        enable_first_block_cache(transformer, config.first_block_cache)
        if config.compile != "off":
            logger.warning("First Block Cache with torch.compile: the cache decision breaks the graph once per "
                           "pass; expect a smaller gain from compile.")
    compile_transformer(transformer, config.compile, config.compile_backend, config.compile_mode)
    hook = SpeedHook(config)
    pipe.set_call_hook("speed", hook if hook.active else None)
    return config


class SpeedHook(CallHook):
    """The per-call part of a speed config: the true-guidance window (``true_guidance_end``, when the call does not
    set ``true_guidance_end_step``), and the step cache's state, reset before each loop and kept per guidance branch
    (diffusers' ``cache_context``)."""

    def __init__(self, config: SpeedConfig):
        self.config = config

    @property
    def active(self) -> bool:
        return self.config.first_block_cache is not None or self.config.true_guidance_end is not None

    def guidance(self, guidance, num_inference_steps):
        if guidance.end_step is not None or self.config.true_guidance_end is None:
            return guidance
        return dataclasses.replace(guidance, end_step=true_guidance_end_step(self.config.true_guidance_end,
                                                                             num_inference_steps))

    def before_denoising(self, pipe, prompts, encode):
        if getattr(pipe.transformer, "is_cache_enabled", False):
            pipe.maybe_free_model_hooks()  # diffusers' public reset of stateful (cache) hooks; re-arms model offload

    def branch(self, pipe, name):
        if getattr(pipe.transformer, "is_cache_enabled", False):
            return pipe.transformer.cache_context(name)
        return contextlib.nullcontext()
