"""Reading one ``.safetensors`` file lazily: names and shapes from the header, tensors on demand, fp8 upcast.

:class:`Checkpoint` is the only place that touches the file. It hides the quantisation bookkeeping of ComfyUI's fp8
files so the converters see plain tensors:

* plain fp8 (``*_fp8_e4m3fn.safetensors``): tensors stored as ``float8_e4m3fn``/``float8_e5m2`` are upcast to the
  compute dtype when read;
* ComfyUI "scaled fp8" (a ``scaled_fp8`` marker tensor plus ``<layer>.scale_weight`` / ``<layer>.scale_input``) and
  the newer per-layer format (``<layer>.comfy_quant`` or the ``_quantization_metadata`` header, with
  ``<layer>.weight_scale``): fp8 weights are dequantised as ``weight * scale`` (per-tensor, as ComfyUI does), the
  scale and marker tensors are dropped;
* other quantisations (NVFP4, MXFP8, int8, bitsandbytes NF4) are refused with a one-line message.

Tensors are read with ``safe_open`` (memory-mapped, never ``torch.load``) one at a time and cast right away, so a
file is never held twice in memory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable

import torch

from ..errors import ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SUPPORTED_QUANT_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def article(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def describe_keys(names: Iterable[str]) -> str | None:
    """What a set of tensor names looks like ("a VAE", "a LoRA", ...), for wrong-file messages; None if unknown."""
    names = list(names)

    def ends(*suffixes: str) -> bool:
        return any(n.endswith(suffixes) for n in names)

    if any(".lora_A." in n or ".lora_down." in n or n.startswith("lora_unet_") for n in names):
        return "a LoRA"
    if ends("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.add_q_proj.weight"):
        return "a FLUX transformer"
    if ends("encoder.conv_in.weight") and ends("decoder.conv_out.weight"):
        return "a VAE"
    if ends("embeddings.token_embedding.weight"):
        return "a CLIP text encoder"
    if ends("SelfAttention.relative_attention_bias.weight"):
        return "a T5 text encoder"
    return None


def check_file(path, what: str, hint: str) -> str:
    """The path as a string, or a one-line error if it does not exist or is not safetensors."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise ModelFormatError(f"{path} is a folder; pass the .safetensors file itself: {hint}.")
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{what} file {path} does not exist; pass {hint}.")
    if not path.endswith((".safetensors", ".sft")):
        raise ModelFormatError(f"{path} is not a .safetensors file; only safetensors are loaded (never pickle): "
                               f"pass {hint}.")
    return path


class Checkpoint:
    """A safetensors file opened lazily, with fp8 dequantisation; ``names`` are the logical tensor names."""

    def __init__(self, path, what: str, hint: str):
        from safetensors import safe_open

        self.path = check_file(path, what, hint)
        self.what, self.hint = what, hint
        try:
            self._file = safe_open(self.path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelFormatError(f"{self.path} is not a valid safetensors file ({reason}); download it again "
                                   f"({hint}).") from None
        self.metadata = self._file.metadata() or {}
        raw = list(self._file.keys())
        self._dtypes = {k: self._file.get_slice(k).get_dtype() for k in raw}
        self._scales: dict[str, str] = {}  # weight name -> scale tensor name
        dropped = self._parse_quantisation(raw)
        self.names = [k for k in raw if k not in dropped]
        self.scaled = bool(self._scales)
        self.fp8 = any(self._dtypes[k] in FP8_DTYPES for k in self.names)

    # ------------------------------------------------------------------ header
    def _parse_quantisation(self, raw: list[str]) -> set[str]:
        keys = set(raw)
        if any(n.endswith((".absmax", ".quant_map")) or ".quant_state." in n for n in raw):
            raise ModelFormatError(
                f"{self.path} is quantised with bitsandbytes (NF4/int8), which this loader does not read; use the "
                f"bf16/fp16 or fp8_e4m3fn file ({self.hint})."
            )
        formats: dict[str, str] = {}
        qmeta = self.metadata.get("_quantization_metadata")
        if qmeta:
            try:
                formats.update({k: v.get("format") for k, v in json.loads(qmeta).get("layers", {}).items()})
            except (ValueError, AttributeError):
                raise ModelFormatError(f"{self.path} has an unreadable _quantization_metadata header; download the "
                                       "file again.") from None
        for k in raw:
            if k.endswith(".comfy_quant"):
                try:
                    conf = json.loads(bytes(self._file.get_tensor(k).tolist()).decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    conf = {"format": "unreadable"}
                formats[k[: -len(".comfy_quant")]] = conf.get("format")
        bad = {layer: fmt for layer, fmt in formats.items() if fmt not in SUPPORTED_QUANT_FORMATS}
        if bad:
            layer, fmt = next(iter(sorted(bad.items())))
            raise ModelFormatError(
                f"{self.path} is quantised with ComfyUI's {fmt} format (e.g. layer {layer}), which this loader does "
                f"not read; use the bf16/fp16 or (scaled) fp8_e4m3fn file instead ({self.hint})."
            )
        dropped = {k for k in raw if k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(_DROPPED_SUFFIXES)}
        for k in raw:
            for suffix in _SCALE_SUFFIXES:
                if not k.endswith(suffix):
                    continue
                weight = k[: -len(suffix)] + ".weight"
                if weight not in keys:
                    raise ModelFormatError(f"{self.path} has the scale {k} but no {weight}; the file is damaged or "
                                           "in an unknown quantised format.")
                if self._dtypes[weight] not in FP8_DTYPES:
                    raise ModelFormatError(
                        f"{self.path} stores {weight} as {self._dtypes[weight]} with a scale ({k}), a quantised "
                        f"format this loader does not read; use the bf16/fp16 or fp8_e4m3fn file ({self.hint})."
                    )
                self._scales[weight] = k
                dropped.add(k)
        if self._scales:
            logger.info("%s: dequantising %d scaled fp8 weights", self.path, len(self._scales))
        return dropped

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        return self._dtypes[name]

    def meta_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Meta tensors with the logical names and shapes (no data read): for checking keys and shapes up front."""
        out = {}
        for n in self.names if names is None else names:
            dt = _SAFETENSORS_DTYPES.get(self._dtypes[n], torch.float32)
            out[n] = torch.empty(self.shape(n), dtype=torch.float32 if dt.is_floating_point else dt, device="meta")
        return out

    # ------------------------------------------------------------------ data
    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, dequantised and cast to ``dtype`` (floating tensors only; integer tensors are returned as is)."""
        t = self._file.get_tensor(name)
        scale_name = self._scales.get(name)
        if scale_name is not None:
            scale = self._file.get_tensor(scale_name).to(torch.float32)
            if scale.numel() == 1:
                scale = scale.reshape(())
            elif scale.ndim == 1 and t.ndim >= 1 and scale.shape[0] == t.shape[0]:
                scale = scale.reshape(-1, *([1] * (t.ndim - 1)))
            else:
                raise ModelFormatError(f"{self.path}: the scale {scale_name} of shape {tuple(scale.shape)} does not "
                                       f"fit {name} of shape {tuple(t.shape)}; unknown quantised format.")
            return (t.to(torch.float32) * scale).to(dtype)
        if t.is_floating_point():
            t = t.to(dtype)
        # safetensors hands out tensors at the file's byte offsets; CPU kernels then pick other code paths (slower,
        # and not bit-identical to from_pretrained), so unaligned tensors get their own aligned memory, one at a time
        return t.clone() if t.data_ptr() % 64 else t

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {n: self.get(n, dtype) for n in names}

    def wrong_file(self, anchor: str) -> ModelFormatError:
        """The error for a file that is not the expected component (names what it looks like, if known)."""
        kind = describe_keys(self.names)
        if kind is not None:
            return ModelFormatError(f"{self.path} is {kind}, not {article(self.what)}; pass {self.hint}.")
        return ModelFormatError(f"{self.path} does not look like {article(self.what)} (no tensor named like "
                                f"{anchor}); pass {self.hint}.")

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_prefix(names: Iterable[str], anchor: str) -> str | None:
    """The prefix ``P`` such that ``P + anchor`` is a name (the shortest if several), or None."""
    found = [n[: -len(anchor)] for n in names if n.endswith(anchor) and (n == anchor or n[-len(anchor) - 1] == ".")]
    if not found:
        return None
    return min(found, key=len)


def check_against_model(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str, what: str,
                        fix: str) -> None:
    """One-line error naming ``path`` if ``state`` does not have exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, model "
                     f"{tuple(expected[k].shape)})")
    raise ModelFormatError(f"{path} does not match {article(what)}: {', '.join(parts)} weights; {fix}.")


def instantiate(factory, state: dict[str, torch.Tensor], path: str, what: str, fix: str, load=None):
    """Build a model with empty (meta) weights, check ``state`` (real or meta tensors) against it, then assign.

    ``load() -> state dict`` gives the real tensors when ``state`` only holds meta tensors, so nothing is read from
    a file whose keys or shapes are wrong. Tensors are assigned, not copied.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = factory()
    check_against_model(state, model, path, what, fix)
    model.load_state_dict(load() if load is not None else state, strict=True, assign=True)
    return model.eval()
