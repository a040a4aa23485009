"""Memory settings: the individual switches (:class:`MemoryConfig`) and the presets named by card size.

A preset is only a :class:`MemoryConfig` with a name; every switch can also be set alone::

    MemoryConfig.from_preset("12gb")                       # fp8 weights, LoRA fused, model offload
    MemoryConfig.from_preset("8gb", gguf_file="dsd-Q4_K.gguf")   # the 8gb preset with a GGUF quant
    MemoryConfig(transformer_weights="fp8", offload="group")
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import DSDError

#: Storage formats of the transformer weights (compute always happens in the pipeline dtype).
TRANSFORMER_WEIGHTS = ("native", "fp8", "int8", "int4", "nf4", "gguf")
#: Storage formats of the text encoders (T5-XXL and CLIP-L).
TEXT_ENCODER_WEIGHTS = ("native", "fp8")
#: Where weights live between uses.
OFFLOAD_MODES = ("none", "model", "group", "sequential")
#: Transformer formats made by quantizing while loading a diffusers ``transformer/`` folder.
QUANTIZED_ON_LOAD = ("int8", "int4", "nf4")


@dataclass(frozen=True)
class MemoryConfig:
    """How the DSD model set is stored and placed. The defaults are the reference: no savings, exact output."""

    transformer_weights: str = field(default="native", metadata={"help": (
        "storage of the transformer weights: native (the pipeline dtype, bf16 on a GPU), fp8 (float8_e4m3fn, upcast "
        "layer by layer; diffusers layerwise casting), int8 / int4 (torchao weight-only; int4 packs to 4 bit on CUDA "
        "only), nf4 (bitsandbytes 4-bit; CUDA), gguf (a GGUF quant file, see gguf_file)")})
    gguf_file: str | None = field(default=None, metadata={"help": (
        "GGUF file of the DSD transformer (c_embedder included; diffusers or BFL/ComfyUI key layout) for "
        "transformer_weights='gguf'")})
    text_encoder_weights: str = field(default="native", metadata={"help": (
        "storage of the T5-XXL and CLIP-L weights: native or fp8 (upcast layer by layer)")})
    offload: str = field(default="none", metadata={"help": (
        "none (everything on the device), model (one component on the GPU at a time), group (transformer streamed "
        "block by block, text encoders and VAE layer by layer; diffusers group offload), sequential (accelerate, "
        "layer by layer, slowest)")})
    group_offload_blocks: int = field(default=1, metadata={"help": (
        "transformer blocks per group for offload='group' (more = fewer transfers, more memory)")})
    group_offload_streams: bool | None = field(default=None, metadata={"help": (
        "overlap transfers with compute on CUDA streams for offload='group' (None: on when the device is CUDA; "
        "needs pinned host memory)")})
    release_text_encoders: bool = field(default=False, metadata={"help": (
        "free the text encoders (device and host memory) once the prompt and negative prompt are encoded; later "
        "runs may reuse those prompts, a new prompt needs the pipeline loaded again")})
    fuse_lora: bool = field(default=False, metadata={"help": (
        "merge the DSD LoRA into the transformer weights before they are stored (saves its memory and compute; "
        "not bit-identical to the reference's unfused LoRA); native and fp8 weights only")})
    preset: str | None = field(default=None, compare=False, metadata={"help": "the preset this config came from"})

    def __post_init__(self):
        _check_choice("transformer_weights", self.transformer_weights, TRANSFORMER_WEIGHTS)
        _check_choice("text_encoder_weights", self.text_encoder_weights, TEXT_ENCODER_WEIGHTS)
        _check_choice("offload", self.offload, OFFLOAD_MODES)
        if isinstance(self.group_offload_blocks, bool) or not isinstance(self.group_offload_blocks, int) \
                or self.group_offload_blocks < 1:
            raise DSDError(f"group_offload_blocks must be a whole number >= 1, got {self.group_offload_blocks!r}.")
        if self.group_offload_streams not in (None, True, False):
            raise DSDError(f"group_offload_streams must be True, False or None (auto), got "
                           f"{self.group_offload_streams!r}.")
        if self.transformer_weights == "gguf" and not self.gguf_file:
            raise DSDError("transformer_weights='gguf' needs gguf_file=<path of the DSD .gguf file>.")
        if self.gguf_file and self.transformer_weights != "gguf":
            raise DSDError(f"gguf_file is set but transformer_weights is {self.transformer_weights!r}; use "
                           "transformer_weights='gguf' (or drop gguf_file).")
        if self.gguf_file is not None:
            object.__setattr__(self, "gguf_file", os.path.expanduser(os.fspath(self.gguf_file)))
        if self.fuse_lora and self.transformer_weights not in ("native", "fp8"):
            raise DSDError(f"fuse_lora works with native or fp8 weights, not {self.transformer_weights!r} (the LoRA "
                           "stays unfused on quantized weights); drop fuse_lora.")
        for name in ("release_text_encoders", "fuse_lora"):
            if not isinstance(getattr(self, name), bool):
                raise DSDError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MemoryConfig":
        """The preset ``name`` (see :data:`PRESETS`) with some switches changed.

        Passing ``gguf_file`` alone switches the transformer to GGUF (``transformer_weights='gguf'``).
        """
        key = str(name).strip().lower()
        if key not in PRESETS:
            raise DSDError(f"unknown memory preset {name!r}; use one of {', '.join(PRESETS)} (or a MemoryConfig).")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise DSDError(f"unknown memory setting(s) {', '.join(sorted(unknown))}; use "
                           f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        if overrides.get("gguf_file") and "transformer_weights" not in overrides:
            overrides["transformer_weights"] = "gguf"
        values = {**PRESETS[key].settings, **overrides}
        values.setdefault("preset", key)
        return cls(**values)

    @classmethod
    def from_name(cls, name: str) -> "MemoryConfig":
        """The preset ``name``: what a UI widget or a CLI flag holds (one-line error naming the presets)."""
        return cls.from_preset(name)

    @property
    def transformer_file(self) -> str | None:
        """The file that brings its own transformer weights (the GGUF quant), replacing the source's; else None."""
        return self.gguf_file if self.transformer_weights == "gguf" else None

    @property
    def quantizes_on_load(self) -> bool:
        """Whether the transformer is quantized while loading a diffusers folder (int8, int4, nf4)."""
        return self.transformer_weights in QUANTIZED_ON_LOAD

    @property
    def exact(self) -> bool:
        """True if the output equals the no-savings output (only placement changes, which is exact)."""
        return (self.transformer_weights == "native" and self.text_encoder_weights == "native"
                and not self.fuse_lora)

    def replace(self, **changes) -> "MemoryConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for logs and UIs."""
        weights = self.transformer_weights if self.transformer_weights != "gguf" else \
            f"gguf ({os.path.basename(self.gguf_file)})"
        parts = [f"transformer {weights}", f"offload {self.offload}"]
        if self.text_encoder_weights != "native":
            parts.append(f"text encoders {self.text_encoder_weights}")
        if self.fuse_lora:
            parts.append("LoRA fused")
        if self.release_text_encoders:
            parts.append("text encoders released after encoding")
        name = f"{self.preset}: " if self.preset else ""
        return name + ", ".join(parts)

    @staticmethod
    def help() -> dict[str, str]:
        """``{field: help text}`` for CLIs and UIs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(MemoryConfig)}


@dataclass(frozen=True)
class Preset:
    settings: dict
    summary: str


#: The presets, from most to least memory. Cards are named by their VRAM in GiB (a "12 GB" card has 12 GiB).
PRESETS: dict[str, Preset] = {
    "full": Preset({}, "no savings: bf16, everything on the GPU (the reference's default); fastest"),
    "24gb": Preset({"offload": "model"},
                   "bf16 weights, one component on the GPU at a time (model offload); same pixels as full"),
    "16gb": Preset({"transformer_weights": "fp8", "offload": "model"},
                   "fp8 transformer weights (upcast per layer), model offload"),
    "12gb": Preset({"transformer_weights": "fp8", "fuse_lora": True, "offload": "model"},
                   "fp8 transformer weights with the LoRA fused in before casting, model offload"),
    "8gb": Preset({"transformer_weights": "nf4", "text_encoder_weights": "fp8", "offload": "model"},
                  "4-bit NF4 transformer (CUDA + bitsandbytes; or a GGUF quant of the transformer instead), fp8 text "
                  "encoders, model offload"),
    "lowest": Preset({"offload": "group"},
                     "bf16 weights streamed block by block (group offload, CUDA streams); least VRAM, slowest"),
}


def check_memory(memory) -> MemoryConfig:
    """``memory`` itself if it is a :class:`MemoryConfig`, ``MemoryConfig()`` (no savings) for ``None``; anything
    else is a one-line error that shows how to make one."""
    if memory is None:
        return MemoryConfig()
    if isinstance(memory, MemoryConfig):
        return memory
    hint = f"MemoryConfig.from_preset({memory!r})" if isinstance(memory, str) else "MemoryConfig(...)"
    raise DSDError(f"memory must be a dsd_core.memory.MemoryConfig or None, got {type(memory).__name__} "
                   f"{memory!r}; use {hint} (presets: {', '.join(PRESETS)}).")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise DSDError(f"unknown {name} {value!r}; use one of {', '.join(choices)}.")
