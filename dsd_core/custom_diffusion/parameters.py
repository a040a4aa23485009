"""Which transformer weights Custom Diffusion tunes on FLUX / DSD, and the deltas that tune them.

Custom Diffusion (Kumari et al., CVPR 2023) tunes only the text-side key/value projections of cross-attention. On
FLUX's MMDiT the closest analogue is the text stream of the 19 double-stream blocks (personalization-methods.md
§5.1-5.2). Presets (:data:`PRESETS`):

* ``kv``        -- ``transformer_blocks.*.attn.add_k_proj`` / ``add_v_proj`` (CD's ``crossattn_kv``, the default);
* ``kv+q+out``  -- also ``add_q_proj`` and ``to_add_out`` (CD's ``crossattn``, recommended for faces).

Options on top of a preset: ``context_embedder`` (the only purely text-side, image-independent linear map), and
``single_text_kv``: a delta on the single-stream blocks' shared ``to_k`` / ``to_v`` applied to the **text rows
only** (the first ``txt_len`` tokens of the joint sequence), so image-token keys/values stay the base model's.

Each target is tuned either as a low-rank delta (``form="lora"``: ``up @ down * alpha / rank``, ``up`` zero-
initialised and ``down`` Kaiming-uniform, exactly peft's LoRA initialisation and scaling) or as a full delta
(``form="full"``: a zero-initialised ``out x in`` matrix). Only weights are tuned; biases stay the base model's.

Why forward hooks and not peft adapters: one mechanism covers all four cases (peft has no full-delta adapter and no
row-masked LoRA), the base weights are never copied or modified (so a DSD LoRA loaded as a peft adapter, fp8 /
quantised storage and offload hooks all keep working underneath), and removing a concept is exact. LoRA-form
deltas are still written in diffusers' peft key layout (see :mod:`.delta_file`), so ``load_lora_weights`` loads
them (``tests/test_custom_diffusion.py`` checks that the two give the same output), and ``export-comfyui`` writes them
as a ComfyUI LoRA (``tests/engine/test_engine_concept_lora.py``: same image as the hooks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

from .options import FORMS, PRESETS  # noqa: E402  (the option lists live with the light options)
SINGLE_TEXT_TARGETS = ("to_k", "to_v")


@dataclass(frozen=True)
class ParameterSet:
    """What a Custom Diffusion run tunes. ``alpha`` defaults to ``rank`` (scale 1)."""

    preset: str = "kv"
    form: str = "lora"
    rank: int = 16
    alpha: float | None = None
    context_embedder: bool = False
    single_text_kv: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise InputError(f"unknown parameter preset {self.preset!r}; choose one of {', '.join(PRESETS)}.")
        if self.form not in FORMS:
            raise InputError(f"unknown delta form {self.form!r}; choose 'lora' (low rank) or 'full'.")
        if self.form == "lora" and self.rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {self.rank}.")

    @property
    def scale(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / self.rank

    def targets(self, transformer: nn.Module) -> list["Target"]:
        """The target layers of this set in ``transformer`` (names as in ``named_modules``), in model order."""
        out = []
        if self.context_embedder:
            out.append(_target(transformer, "context_embedder", "all"))
        for i in range(len(transformer.transformer_blocks)):
            for proj in PRESETS[self.preset]:
                out.append(_target(transformer, f"transformer_blocks.{i}.attn.{proj}", "all"))
        if self.single_text_kv:
            for i in range(len(transformer.single_transformer_blocks)):
                for proj in SINGLE_TEXT_TARGETS:
                    out.append(_target(transformer, f"single_transformer_blocks.{i}.attn.{proj}", "text"))
        return out

    def to_metadata(self) -> dict:
        return dict(preset=self.preset, form=self.form, rank=self.rank, alpha=self.alpha,
                    context_embedder=self.context_embedder, single_text_kv=self.single_text_kv)


@dataclass(frozen=True)
class Target:
    """One tuned linear layer: its module name, which rows of its input it acts on, and its shape."""

    name: str
    rows: str  # "all" or "text" (the first txt_len tokens of the joint sequence)
    in_features: int
    out_features: int


def _target(transformer: nn.Module, name: str, rows: str) -> Target:
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        raise InputError(f"the transformer has no layer {name}; is it a FLUX / DSD transformer?") from None
    base = getattr(module, "base_layer", module)  # a peft-wrapped layer (e.g. the DSD LoRA)
    return Target(name, rows, int(base.in_features), int(base.out_features))


class LayerDelta(nn.Module):
    """The delta of one linear layer: ``x @ (up @ down * scale).T`` (low rank) or ``x @ weight.T`` (full)."""

    def __init__(self, target: Target, rank: int | None, scale: float = 1.0, dtype=torch.float32):
        super().__init__()
        self.target = target
        self.scale = float(scale)
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(target.out_features, target.in_features, dtype=dtype))
            self.down = self.up = None
        else:
            self.weight = None
            self.down = nn.Parameter(torch.empty(rank, target.in_features, dtype=dtype))
            self.up = nn.Parameter(torch.zeros(target.out_features, rank, dtype=dtype))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # peft's LoRA A initialisation

    @property
    def low_rank(self) -> bool:
        return self.weight is None

    @property
    def rank(self) -> int | None:
        return None if self.weight is not None else self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return nn.functional.linear(x, self.weight)
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up) * self.scale

    def matrix(self) -> torch.Tensor:
        """The dense ``out x in`` delta."""
        if self.weight is not None:
            return self.weight.detach()
        return (self.up.detach() @ self.down.detach()) * self.scale

    @classmethod
    def from_tensors(cls, target: Target, weight: torch.Tensor | None = None, up: torch.Tensor | None = None,
                     down: torch.Tensor | None = None) -> "LayerDelta":
        """A delta holding given values (``up`` already scaled; scale 1)."""
        if weight is not None:
            layer = cls(target, None, dtype=weight.dtype)
            layer.weight.data.copy_(weight)
        else:
            layer = cls(target, down.shape[0], dtype=down.dtype)
            layer.down.data.copy_(down)
            layer.up.data.copy_(up)
        return layer


class _TextLength:
    """The text-token count of the transformer call in progress (for text-rows-only deltas)."""

    def __init__(self):
        self.value: int | None = None

    def hook(self, module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and len(args) > 1:
            ehs = args[1]
        self.value = None if ehs is None else int(ehs.shape[1])


class ConceptDeltas(nn.Module):
    """The per-layer deltas of a concept (or of a merge), applied to a transformer through forward hooks.

    ``attach(transformer)`` adds each delta's output to its layer's output (``scale`` times); ``detach()`` removes
    them, leaving the transformer exactly as it was. Several ``ConceptDeltas`` can be attached at once (their
    outputs add up, i.e. naive combination; use :mod:`.merge` to combine concepts properly).
    """

    def __init__(self, layers: list[LayerDelta]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._handles: list = []
        self._text_length = _TextLength()
        self.scale = 1.0

    @classmethod
    def create(cls, transformer: nn.Module, params: ParameterSet, seed: int | None = None) -> "ConceptDeltas":
        """Fresh trainable deltas (zero effect at step 0) for ``params`` on ``transformer``."""
        rank = None if params.form == "full" else params.rank
        gen_state = None
        if seed is not None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            layers = [LayerDelta(t, rank, params.scale) for t in params.targets(transformer)]
        finally:
            if gen_state is not None:
                torch.random.set_rng_state(gen_state)
        return cls(layers)

    @property
    def names(self) -> list[str]:
        return [layer.target.name for layer in self.layers]

    def by_name(self) -> dict[str, LayerDelta]:
        return {layer.target.name: layer for layer in self.layers}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach(self, transformer: nn.Module, scale: float = 1.0) -> "ConceptDeltas":
        if self._handles:
            raise InputError("these concept deltas are already attached; detach() them first.")
        self.scale = float(scale)
        if any(layer.target.rows == "text" for layer in self.layers):
            self._handles.append(transformer.register_forward_pre_hook(self._text_length.hook, with_kwargs=True))
        for layer in self.layers:
            module = transformer.get_submodule(layer.target.name)
            self._handles.append(module.register_forward_hook(self._make_hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _make_hook(self, layer: LayerDelta):
        text_length = self._text_length

        def hook(module, args, output):
            x = args[0]
            param = layer.weight if layer.weight is not None else layer.down
            if param.device != x.device:  # offloaded model: follow the layer to its execution device
                layer.to(x.device)
                param = layer.weight if layer.weight is not None else layer.down
            scale = self.scale
            if layer.target.rows == "text":
                n = text_length.value
                if n is None:
                    raise RuntimeError(f"{layer.target.name}: text length unknown; call the transformer with "
                                       "encoder_hidden_states.")
                delta = layer(x[:, :n].to(param.dtype)).to(output.dtype) * scale
                return torch.cat([output[:, :n] + delta, output[:, n:]], dim=1)
            return output + layer(x.to(param.dtype)).to(output.dtype) * scale

        return hook


def describe(deltas: ConceptDeltas, params: ParameterSet | None = None) -> str:
    """A short table of the tuned layers and the parameter count (printed before training)."""
    groups: dict[str, list] = {}
    for layer in deltas.layers:
        key = re.sub(r"\.\d+\.", ".*.", layer.target.name) + (" (text rows)" if layer.target.rows == "text" else "")
        groups.setdefault(key, []).append(layer)
    head = "Custom Diffusion parameters"
    if params is not None:
        form = f"LoRA rank {params.rank}, alpha {params.alpha or params.rank}" if params.form == "lora" else "full"
        head += f": preset {params.preset}, {form}"
    lines = [head]
    for key, layers in groups.items():
        n = sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
        lines.append(f"  {key:55s} x{len(layers):3d}  {n:>13,d} params")
    total = deltas.num_parameters()
    lines.append(f"  {'total':60s}  {total:>13,d} params ({total * 2 / 2**20:.1f} MiB in bf16)")
    return "\n".join(lines)


def full_size_count(params: ParameterSet, num_layers: int = 19, num_single_layers: int = 38, inner: int = 3072,
                    joint: int = 4096) -> int:
    """Parameters of ``params`` on a full-size FLUX.1-dev transformer (arithmetic, no model needed)."""

    def size(i, o):
        return i * o if params.form == "full" else params.rank * (i + o)

    n = num_layers * len(PRESETS[params.preset]) * size(inner, inner)
    if params.context_embedder:
        n += size(joint, inner)
    if params.single_text_kv:
        n += num_single_layers * 2 * size(inner, inner)
    return n
