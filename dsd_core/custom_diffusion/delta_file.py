"""The concept delta file: one ``.safetensors`` holding a tuned (merged, compressed) concept, and applying it.

Tensors (all float32 unless saved otherwise):

* ``transformer.<layer>.lora_A.weight`` (r x in) and ``transformer.<layer>.lora_B.weight`` (out x r): low-rank
  deltas, in diffusers' peft key layout with the LoRA scale folded into ``lora_B`` (alpha = r). Ranks may differ per
  layer (compressed or merged files). These keys load as-is with diffusers' ``pipe.load_lora_weights(file)``.
  ComfyUI's LoRA loader applies them too but logs every ``concept.*`` key below as "lora key not loaded":
  ``custom-diffusion export-comfyui`` (:mod:`.export`) writes a clean ComfyUI LoRA and the token embeddings;
* ``concept.full.<layer>.weight`` (out x in): full-form deltas;
* ``concept.text_rows.<layer>.lora_A.weight`` / ``lora_B.weight`` / ``weight``: single-stream ``to_k`` / ``to_v``
  deltas that act on the text rows only (no standard loader can express that; diffusers and ComfyUI skip them);
* ``concept.modifier_tokens.t5`` (n x 4096) and optionally ``concept.modifier_tokens.clip`` (n x 768);
* ``concept.base_probe.<layer>`` (32 values): weights of the base model at fixed positions of each tuned layer,
  so loading into another base is detected (see :func:`check_base`).

Header metadata (strings): ``format`` = ``dsd-custom-diffusion``, ``format_version``, ``base_hash`` (sha256 of the
probes rounded to bf16), ``base_kind`` (``flux`` or ``dsd``), ``parameters`` (preset, form, rank, alpha, options as
JSON), ``tokens`` (JSON list of ``{token, init_word}``), ``encoders``, ``concepts`` (JSON: prompts per concept),
``rank`` (max rank, or ``full``), and ``compression`` / ``merge`` (JSON) when they apply.

Note that diffusers' ``load_lora_weights`` applies only the transformer part: the modifier tokens need
:func:`apply_concept` (or the ComfyUI node). A native ComfyUI workflow does not know ``<new1>``; the exported
embedding file gives its T5 vector to ComfyUI's tokenizer as ``embedding:new1`` (:mod:`.export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field

import torch

from ..errors import InputError, ModelFormatError, ModelNotFoundError
from .parameters import ConceptDeltas, LayerDelta, Target
from .tokens import ModifierTokens, find_tokens

FORMAT = "dsd-custom-diffusion"
FORMAT_VERSION = "1"
PROBE_SIZE = 32
#: Relative distance of the probed base weights above which a delta is refused as made for another base.
BASE_TOLERANCE = 0.1


# ---------------------------------------------------------------------------------------------- base identity
def _base_weight(module) -> torch.Tensor:
    base = getattr(module, "base_layer", module)  # under a peft adapter (the DSD LoRA)
    return base.weight


def base_probe(transformer, names: list[str]) -> dict[str, torch.Tensor]:
    """``PROBE_SIZE`` base weights of each named layer at positions fixed by the layer name."""
    out = {}
    for name in names:
        w = _base_weight(transformer.get_submodule(name))
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        idx = torch.randint(0, w.numel(), (PROBE_SIZE,), generator=gen)
        out[name] = w.detach().reshape(-1)[idx.to(w.device)].float().cpu()
    return out


def probe_hash(probe: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(probe):
        h.update(name.encode())
        h.update(probe[name].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def is_dsd(pipe) -> bool:
    """True for a DSD pipeline (reference-conditioned), False for plain FLUX text-to-image."""
    from ..pipeline import DSDPipeline

    return isinstance(pipe, DSDPipeline)


def base_kind(pipe) -> str:
    return "dsd" if is_dsd(pipe) else "flux"


def check_base(transformer, probe: dict[str, torch.Tensor], source: str = "the delta") -> float:
    """The relative distance between the probed weights and ``transformer``'s; raise if above the tolerance.

    Tolerates bf16 / fp8 storage of the same base (distance < ~0.05), refuses another model (distance ~1).
    Weights that cannot be read as numbers (e.g. packed 4-bit storage) skip the check.
    """
    num = den = 0.0
    for name, values in probe.items():
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            raise ModelFormatError(f"{source} tunes layer {name}, which this transformer does not have; it was "
                                   "made for a different model architecture.") from None
        try:
            now = base_probe(transformer, [name])[name]
        except (RuntimeError, TypeError, NotImplementedError):
            return float("nan")
        if _base_weight(module).numel() == 0:
            return float("nan")
        num += float((now - values).pow(2).sum())
        den += float(values.pow(2).sum())
    dist = (num / max(den, 1e-30)) ** 0.5
    if dist > BASE_TOLERANCE:
        raise ModelFormatError(
            f"{source} was made for a different base model: the tuned layers' base weights differ by {dist:.0%} "
            "(the same base in bf16/fp8 differs by < 5%). Apply it to the model it was trained on, or train the "
            "concept on this model (pass check_base=False / --no-check-base to force, at your own risk).")
    return dist


# ---------------------------------------------------------------------------------------------- the file
@dataclass
class ConceptFile:
    """A concept delta in memory: deltas, modifier tokens, base probe, and descriptive info."""

    deltas: ConceptDeltas
    tokens: ModifierTokens | None
    probe: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    @property
    def token_names(self) -> list[str]:
        return list(self.tokens.tokens) if self.tokens is not None else []

    def tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.deltas.layers:
            name, text = layer.target.name, layer.target.rows == "text"
            if layer.low_rank:
                prefix = f"concept.text_rows.{name}" if text else f"transformer.{name}"
                out[f"{prefix}.lora_A.weight"] = layer.down.detach()
                out[f"{prefix}.lora_B.weight"] = layer.up.detach() * layer.scale
            else:
                out[f"concept.text_rows.{name}.weight" if text else f"concept.full.{name}.weight"] = \
                    layer.weight.detach()
        out = {k: v.to(dtype) for k, v in out.items()}
        if self.tokens is not None:
            out.update({f"concept.{k}": v.float() for k, v in self.tokens.state().items()})
        out.update({f"concept.base_probe.{k}": v.float() for k, v in self.probe.items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        ranks = [layer.rank for layer in self.deltas.layers if layer.low_rank]
        full = any(not layer.low_rank for layer in self.deltas.layers)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "base_hash": probe_hash(self.probe),
            "rank": "full" if full else str(max(ranks) if ranks else 0),
            "tokens": json.dumps([{"token": t, "init_word": w} for t, w in
                                  zip(self.token_names, self.tokens.init_words if self.tokens else [])]),
            "encoders": json.dumps(self.tokens.encoders if self.tokens else []),
        }
        for key, value in self.info.items():
            meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return meta

    def save(self, path: str, dtype: torch.dtype = torch.float32) -> str:
        """Write atomically (temp file, then rename); returns ``path``."""
        from ..training.io import atomic_save_file

        if not str(path).endswith(".safetensors"):
            raise InputError(f"{path}: concept deltas are written as .safetensors; give a path ending in it.")
        atomic_save_file(self.tensors(dtype), path, metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str) -> "ConceptFile":
        from safetensors import safe_open

        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"concept delta {path} does not exist; pass the .safetensors written by "
                                     "`custom-diffusion train`.")
        if not path.endswith(".safetensors"):
            raise ModelFormatError(f"{path} is not a .safetensors file; only safetensors are loaded (never pickle).")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelFormatError(f"{path} is not a readable safetensors file ({e}).") from None
        if meta.get("format") != FORMAT:
            raise ModelFormatError(f"{path} is not a Custom Diffusion concept delta (format {meta.get('format')!r}); "
                                   "load plain LoRAs with a LoRA loader instead.")
        layers = []
        for key in sorted(tensors):
            for prefix, rows in (("transformer.", "all"), ("concept.text_rows.", "text")):
                if key.startswith(prefix) and key.endswith(".lora_A.weight"):
                    name = key[len(prefix):-len(".lora_A.weight")]
                    down, up = tensors[key].float(), tensors[f"{prefix}{name}.lora_B.weight"].float()
                    layers.append(LayerDelta.from_tensors(Target(name, rows, down.shape[1], up.shape[0]),
                                                          up=up, down=down))
            for prefix, rows in (("concept.full.", "all"), ("concept.text_rows.", "text")):
                if key.startswith(prefix) and key.endswith(".weight") and ".lora_" not in key:
                    name = key[len(prefix):-len(".weight")]
                    w = tensors[key].float()
                    layers.append(LayerDelta.from_tensors(Target(name, rows, w.shape[1], w.shape[0]), weight=w))
        token_info = json.loads(meta.get("tokens", "[]"))
        tokens = None
        if token_info:
            tokens = ModifierTokens.from_state({k[len("concept."):]: v for k, v in tensors.items()
                                                if k.startswith("concept.modifier_tokens.")},
                                               [t["token"] for t in token_info], [t["init_word"] for t in token_info])
        probe = {k[len("concept.base_probe."):]: v for k, v in tensors.items() if k.startswith("concept.base_probe.")}
        info = {}
        for key, value in meta.items():
            if key in ("format", "format_version", "base_hash", "rank", "tokens", "encoders"):
                continue
            try:
                info[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                info[key] = value
        order = {name: i for i, name in enumerate(probe)}
        layers.sort(key=lambda layer: order.get(layer.target.name, len(order)))
        return cls(ConceptDeltas(layers), tokens, probe, info)

    # ------------------------------------------------------------------ application
    def apply(self, pipe, scale: float = 1.0, check: bool = True) -> "AppliedConcept":
        """Attach the deltas and tokens to a FLUX or DSD pipeline; undo with ``.remove()``."""
        if check:
            check_base(pipe.transformer, self.probe, self.info.get("name", "this concept delta"))
            made_for = self.info.get("base_kind")
            if made_for and made_for != base_kind(pipe):
                import logging

                logging.getLogger(__name__).warning(
                    "this concept delta was tuned on a %s model and is applied to a %s model; the base weights "
                    "match, but expect a weaker effect.", made_for, base_kind(pipe))
        if self.tokens is not None:
            self.tokens.attach(pipe)
        try:
            self.deltas.attach(pipe.transformer, scale)
        except Exception:
            if self.tokens is not None:
                self.tokens.detach()
            raise
        applied = AppliedConcept(pipe, self)
        pipe.__dict__.setdefault("_dsd_concepts", []).append(applied)
        return applied


class AppliedConcept:
    """Handle of a concept attached to a pipeline."""

    def __init__(self, pipe, concept: ConceptFile):
        self.pipe, self.concept = pipe, concept

    def remove(self) -> None:
        self.concept.deltas.detach()
        if self.concept.tokens is not None:
            self.concept.tokens.detach()
        applied = self.pipe.__dict__.get("_dsd_concepts", [])
        if self in applied:
            applied.remove(self)


def applied_tokens(pipe) -> list[str]:
    """The modifier tokens of every concept applied to ``pipe``."""
    return [t for a in pipe.__dict__.get("_dsd_concepts", []) for t in a.concept.token_names]


def check_prompt_tokens(pipe, prompt: str) -> None:
    """Raise :class:`InputError` if ``prompt`` uses a ``<token>`` no applied concept defines."""
    from .tokens import check_prompt

    check_prompt(prompt, applied_tokens(pipe))


def apply_concept(pipe, path: str, scale: float = 1.0, check: bool = True) -> AppliedConcept:
    """Load a concept delta file and apply it to ``pipe`` (FLUX or DSD); returns the handle to remove it."""
    return ConceptFile.load(path).apply(pipe, scale, check)



__all__ = ["ConceptFile", "AppliedConcept", "apply_concept", "applied_tokens", "check_prompt_tokens", "base_probe",
           "check_base", "find_tokens"]
