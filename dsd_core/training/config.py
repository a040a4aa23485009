"""Training configuration: dataclasses whose fields are the CLI flags and the YAML keys.

Every field carries ``metadata={"help": ...}`` (the CLI help text and the node tooltips) and optionally
``"choices"``. One run is described by two dataclasses:

* :class:`TrainConfig` -- what every method shares: data, model source, optimiser, schedule, checkpoints, logging;
* the method's own options (e.g. :class:`dsd_core.training.methods.dsd_lora.DSDLoRAOptions`).

Precedence when both are given: defaults < YAML file (``--config FILE.yaml``, flat ``key: value`` lines; the keys are
the field names) < flags on the command line. An unknown YAML key is an error naming the key, so a typo never
silently trains with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRAIN_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _f(default, help: str, choices=None, const=None, **kw):
    meta = {"help": help}
    if const is not None:
        meta["const"] = const  # the flag may be given without a value
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Options every training method shares (the engine's). Units: steps are optimiser steps."""

    # data
    data: str = _f("", "paired dataset: a folder with metadata.jsonl, or a local Hugging Face dataset folder / "
                       ".parquet / .arrow file (see --reference-column etc.)")
    reference_column: str = _f("reference", "column (or metadata.jsonl key) of the reference image")
    target_column: str = _f("target", "column (or metadata.jsonl key) of the target image")
    caption_column: str = _f("caption", "column (or metadata.jsonl key) of the caption")
    panel_size: int = _f(512, "side of each square panel in pixels; the training canvas is panel x 2*panel "
                              "(DSD: 512). Images are centre-cropped and resized to it")
    min_image_size: int = _f(256, "images whose shorter side is below this are reported as bad items before "
                                  "training")
    validation_pairs: int = _f(2, "number of dataset pairs (the first ones) rendered as validation images")
    # model source
    base: str = _f("black-forest-labs/FLUX.1-dev", "FLUX.1-dev diffusers folder or repo id (VAE, text encoders, "
                                                   "tokenizers, scheduler)")
    model: str = _f("", "start from this DSD model folder (transformer/ + pytorch_lora_weights.safetensors): its "
                        "LoRA is the starting adapter")
    from_flux: str = _f("", "start from this plain FLUX transformer folder with a fresh zero c_embedder and a new LoRA")
    output: str = _f("", "output folder: becomes a DSD model folder; checkpoints/ and logs/ go inside")
    dtype: str = _f("auto", "dtype of the frozen weights (auto: bfloat16 on GPU, float32 on CPU)", TRAIN_DTYPES)
    memory: str = _f("full", "memory preset of the frozen model (see `python -m dsd_core memory`); training uses its "
                             "weight storage only (no offload, LoRA unfused)")
    base_weights: str = _f("", "storage of the frozen transformer weights, overriding the preset's: native, fp8 "
                               "(float8, upcast per layer), int8 / int4 (torchao), nf4 (bitsandbytes, CUDA)",
                           ("", "native", "fp8", "int8", "int4", "nf4"))
    text_encoder_weights: str = _f("", "storage of the frozen T5/CLIP weights, overriding the preset's: native or fp8",
                                   ("", "native", "fp8"))
    device: str = _f("", "cpu to force the CPU (like --cpu); otherwise accelerate places each process on its GPU")
    cpu: bool = _f(False, "train on the CPU even if a GPU is present (tests, tiny models)")
    local_files_only: bool = _f(False, "never download models")
    # optimisation
    max_steps: int = _f(1000, "optimiser steps to train")
    batch_size: int = _f(1, "pairs per process per micro-step")
    gradient_accumulation: int = _f(1, "micro-steps per optimiser step (effective batch = batch_size x this x "
                                       "processes)")
    lr: float = _f(1e-4, "learning rate (paper: 1e-4 with AdamW)")
    optimizer: str = _f("adamw", "adamw (torch), adamw8bit (bitsandbytes, CUDA), adafactor (transformers), sgd",
                        OPTIMIZERS)
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "clip gradients to this norm (0: no clipping)")
    lr_scheduler: str = _f("constant", "learning-rate schedule", LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "warm-up steps of the schedule")
    mixed_precision: str = _f("auto", "accelerate autocast of the forward pass; auto: bf16/fp16 when the frozen "
                                      "weights are bf16/fp16 (trainable weights stay float32), no on float32",
                              MIXED_PRECISION)
    gradient_checkpointing: bool = _f(True, "recompute block activations in the backward pass (much less memory, "
                                            "~30 % slower)")
    seed: int = _f(0, "seed of data order, noise, timesteps and dropout (a run is reproducible from it)")
    # checkpoints and logs
    checkpoint_every: int = _f(250, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(3, "keep the last K checkpoints (0: keep all)")
    resume: str = _f("", "resume: --resume alone or 'latest' (the newest checkpoint in OUTPUT/checkpoints; a fresh "
                         "start if there is none yet), or a checkpoint folder", const="latest")
    validate_every: int = _f(250, "render validation images every M steps (0: never)")
    validation_steps: int = _f(28, "denoising steps of the validation images")
    log_every: int = _f(1, "write the loss every N steps to OUTPUT/logs/loss.csv (and TensorBoard if installed)")
    num_workers: int = _f(0, "kept for config compatibility: items come from the encoded cache in memory, so there "
                             "is no loading to parallelise")
    cache_dir: str = _f("", "where VAE latents and text embeddings are cached (default: DATA/.dsd_cache; reused "
                            "by later runs on the same data and models)")

    def __post_init__(self):
        check_choices(self)
        for name in ("max_steps", "batch_size", "gradient_accumulation", "panel_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.panel_size % 16:
            raise InputError(f"panel_size must be a multiple of 16 (VAE x 2x2 packing), got {self.panel_size}.")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}.")
        for name in ("checkpoint_every", "keep_checkpoints", "validate_every", "log_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be 0 or more, got {getattr(self, name)}.")


# ---------------------------------------------------------------------------------------------- helpers
def check_choices(obj) -> None:
    """Raise :class:`InputError` for a field value outside its ``choices`` metadata."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(obj, f.name) not in choices:
            raise InputError(f"{f.name}={getattr(obj, f.name)!r} is not one of {', '.join(map(str, choices))}.")


def option_fields(cls) -> list:
    """``cls``'s dataclass fields, its own first and then those it inherits (e.g. :class:`~dsd_core.training.methods.
    options.NoiseOptions`), so flags and example files list a method's own options first."""
    own = cls.__dict__.get("__annotations__", {})
    fs = dataclasses.fields(cls)
    return [f for f in fs if f.name in own] + [f for f in fs if f.name not in own]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(cls, f) -> type:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    origin = typing.get_origin(t)
    if origin in (list, tuple):
        return list
    return t


def _parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def add_config_arguments(parser: argparse.ArgumentParser, *classes, title: str | None = None,
                         seen: set | None = None) -> None:
    """Add one flag per field of each dataclass (``--max-steps``; booleans ``--flag`` / ``--no-flag``).

    Defaults are left out of the namespace (``argparse.SUPPRESS``) so that :func:`build_config` can tell a flag that
    was given from one that was not, and let the YAML file fill the rest. Names already in ``seen`` are skipped (two
    methods may share an option name; the value goes to whichever method runs).
    """
    seen = set() if seen is None else seen
    for cls in classes:
        group = parser.add_argument_group(title or cls.__doc__.splitlines()[0] if cls.__doc__ else cls.__name__)
        for f in option_fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text += f" (default: {default!r})"
            t = _field_type(cls, f)
            kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
            if t is bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            elif t is list:
                group.add_argument(flag(f.name), type=lambda s: [x for x in s.split(",") if x], **kw)
            elif "const" in f.metadata:
                group.add_argument(flag(f.name), type=t, nargs="?", const=f.metadata["const"], **kw)
            else:
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
                group.add_argument(flag(f.name), type=t, **kw)


def read_yaml(path: str) -> dict:
    """A flat mapping from a YAML file (``--config``); ``-`` in keys is accepted for ``_``."""
    import yaml

    if not os.path.isfile(path):
        raise InputError(f"config file {path} does not exist.")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of option: value lines, got {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(values: dict, *classes, source: str = "the options") -> list:
    """Instantiate each dataclass from a flat ``values`` mapping; keys no class knows are an error."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown option(s) in {source}: {', '.join(unknown)}; see `python -m dsd_core train "
                         f"--help` for the valid names.")
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kw[f.name] = _coerce(values[f.name], hints[f.name], f.name)
        out.append(cls(**kw))
    return out


def _coerce(value, t, name):
    origin = typing.get_origin(t)
    try:
        if t is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if origin in (list, tuple):
            return list(value.split(",")) if isinstance(value, str) else list(value)
        if t in (int, float, str):
            if t is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return t(value) if value is not None else t()
    except (ValueError, argparse.ArgumentTypeError):
        raise InputError(f"option {name}: {value!r} is not a valid {getattr(t, '__name__', t)}.") from None
    return value


def config_from_args(args: argparse.Namespace, *classes, ignore: tuple = ()) -> list:
    """Dataclasses from parsed flags plus the optional ``args.config`` YAML (flags win); YAML keys in ``ignore``
    are not options (e.g. ``method``)."""
    values: dict[str, Any] = {}
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        values.update({k: v for k, v in read_yaml(cfg_file).items() if k not in ignore})
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return build_config(values, *classes, source=cfg_file or "the flags")


def to_dict(*configs) -> dict:
    out = {}
    for c in configs:
        out.update(dataclasses.asdict(c))
    return out


def write_config(path: str, *configs) -> None:
    """The resolved options as JSON next to the artifacts (atomically)."""
    from .io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(*configs), indent=2, sort_keys=True) + "\n")


def example_yaml(*classes, values: dict | None = None) -> str:
    """A commented YAML with every option: its help, its choices, and its value (``values`` or the default)."""
    import yaml

    lines = []
    for cls in classes:
        lines.append(f"# ---- {cls.__doc__.splitlines()[0] if cls.__doc__ else cls.__name__}")
        for f in option_fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = (values or {}).get(f.name, default)
            lines.append(f"# {f.metadata.get('help', '')}")
            if "choices" in f.metadata:
                lines.append(f"#   choices: {', '.join(map(str, f.metadata['choices']))}")
            lines.append(yaml.safe_dump({f.name: default}, default_flow_style=True, width=1000).strip()[1:-1])
        lines.append("")
    return "\n".join(lines)
