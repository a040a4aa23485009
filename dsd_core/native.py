"""DSD on ComfyUI's own FLUX model: the pieces that need no ComfyUI (the nodes in ``nodes/native.py`` wrap them).

DSD is FLUX.1-dev plus one layer, ``c_embedder`` (Linear 64 -> hidden), whose output is *added* to the image-token
embedding: ``hidden = x_embedder(x) + c_embedder(c)``. ComfyUI's FLUX concatenates a condition latent to the noisy
latent on the channel axis when ``img_in`` is wider than the latent (``Flux.concat_cond``, the mechanism of FLUX
control LoRAs). With the widened weight ``[W_x | W_c]`` and bias ``b_x + b_c``::

    img_in([x; c]) = W_x x + W_c c + b_x + b_c = x_embedder(x) + c_embedder(c)

exactly (up to the order of the float additions). This module:

* reads the two ``c_embedder`` tensors from a DSD transformer file in any layout (streamed: nothing else is loaded),
  or from the small patch file :func:`save_c_embedder` writes;
* builds the padded ``img_in`` weight/bias *diffs* for ComfyUI's ``pad_weight`` patch (:func:`img_in_patch`);
* gives the reference's sigma schedule (:func:`reference_sigmas`);
* compares two transformer files tensor by tensor, streaming (:func:`compare_transformers`), to tell whether a DSD
  transformer equals FLUX.1-dev apart from ``c_embedder``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError, ModelFormatError
from .single_file.checkpoint import Checkpoint, find_prefix
from .single_file.transformer import BFL_ANCHOR, CONDITION_ANCHOR, DIFFUSERS_ANCHOR, bfl_to_diffusers

#: FLUX latent channels and patch size: a packed token has 16 * 2 * 2 = 64 channels.
LATENT_CHANNELS = 16
PATCH = 2
PATCH_HINT = ("a DSD transformer file (e.g. primecai/dsd_model's transformer saved as one .safetensors, any layout) "
              "or the c_embedder patch made by `python -m dsd_core extract-c-embedder`")
FLUX_HINT = "a FLUX transformer .safetensors (diffusers or BFL/ComfyUI layout)"


@dataclass
class CEmbedder:
    """The DSD condition embedder: ``weight`` (hidden, 64) and ``bias`` (hidden,), float32."""

    weight: torch.Tensor
    bias: torch.Tensor
    source: str = ""

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


def read_c_embedder(path, dtype: torch.dtype | None = torch.float32) -> CEmbedder:
    """The ``c_embedder`` weight and bias of a DSD transformer file or patch file (only those two tensors are read).

    ``dtype=None`` keeps a bf16/fp16/fp32 file's stored dtype (fp8 is dequantised to float32).

    Raises:
        ModelNotFoundError: no such file.
        ModelFormatError: not safetensors, or no ``c_embedder`` in it (e.g. plain FLUX.1-dev), or several.
    """
    with Checkpoint(path, "DSD c_embedder", PATCH_HINT) as ck:
        weights = [n for n in ck.names if n == CONDITION_ANCHOR or n.endswith("." + CONDITION_ANCHOR)]
        if not weights:
            plain = find_prefix(ck.names, BFL_ANCHOR) is not None or find_prefix(ck.names, DIFFUSERS_ANCHOR) is not None
            what = "a plain FLUX transformer" if plain else "a file"
            raise ModelFormatError(f"{ck.path} is {what} without c_embedder weights, so it cannot make a FLUX model "
                                   f"DSD; pass {PATCH_HINT}.")
        if len(weights) > 1:
            raise ModelFormatError(f"{ck.path} holds {len(weights)} c_embedder weights ({', '.join(weights[:3])}); "
                                   "pass a file with one DSD transformer.")
        bias_name = weights[0][: -len("weight")] + "bias"
        if bias_name not in ck.names:
            raise ModelFormatError(f"{ck.path} has {weights[0]} but no {bias_name}; the file is damaged.")
        if dtype is None:
            stored = ck.stored_dtype(weights[0])
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)
        weight, bias = ck.get(weights[0], dtype), ck.get(bias_name, dtype)
    if weight.ndim != 2 or weight.shape[1] != LATENT_CHANNELS * PATCH * PATCH or bias.shape != weight.shape[:1]:
        raise ModelFormatError(f"{path}: c_embedder has shape {tuple(weight.shape)} / {tuple(bias.shape)}, expected "
                               f"(hidden, {LATENT_CHANNELS * PATCH * PATCH}) / (hidden,); not a DSD file.")
    return CEmbedder(weight.contiguous(), bias.contiguous(), os.fspath(path))


def save_c_embedder(emb: CEmbedder, out_path) -> str:
    """Write the patch file (``c_embedder.weight`` + ``c_embedder.bias``, stored dtype kept) atomically."""
    from .files import save_safetensors

    out_path = os.path.abspath(os.path.expanduser(os.fspath(out_path)))
    if not out_path.endswith(".safetensors"):
        raise InputError(f"{out_path}: the patch is written as safetensors; name it *.safetensors.")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    meta = {"dsd_c_embedder": json.dumps({"source": os.path.basename(emb.source), "hidden_size": emb.hidden_size})}
    save_safetensors({"c_embedder.weight": emb.weight.contiguous(), "c_embedder.bias": emb.bias.contiguous()},
                     out_path, metadata=meta)
    return out_path


def extract_c_embedder(transformer_path, out_path) -> str:
    """Read ``c_embedder`` from a DSD transformer file and write it as a small patch file (stored dtype kept; fp8 and
    scaled fp8 become float32)."""
    return save_c_embedder(read_c_embedder(transformer_path, dtype=None), out_path)


@dataclass
class ImgInPatch:
    """Diffs for ComfyUI's ``("diff", (tensor, {"pad_weight": True}))`` patches of ``img_in``."""

    weight: torch.Tensor  # (hidden, 2 * in): zeros | W_c
    bias: torch.Tensor  # (hidden,): b_c


def img_in_patch(img_in_shape, emb: CEmbedder, patch_size: int = PATCH,
                 latent_channels: int = LATENT_CHANNELS) -> ImgInPatch:
    """The padded ``img_in`` diffs that turn FLUX's ``img_in`` into ``x_embedder(x) + c_embedder(c)``.

    ``img_in_shape`` is the model's current ``img_in.weight`` shape (hidden, channels * patch^2).

    Raises:
        InputError: ``img_in`` is already wider than the latent (widened by a control LoRA, an inpainting model or
            DSD applied twice), or the hidden size / input width does not match the ``c_embedder``.
    """
    hidden, width = int(img_in_shape[0]), int(img_in_shape[1])
    x_width = latent_channels * patch_size * patch_size
    if width > x_width:
        raise InputError(
            f"the model's img_in already takes {width // (patch_size * patch_size)} latent channels, not "
            f"{latent_channels}: something (a FLUX control/fill LoRA or model, or a second DSD apply node) widened it. "
            "Apply DSD to a plain FLUX.1-dev MODEL and put other img_in patches elsewhere.")
    if width != x_width or emb.in_features != x_width:
        raise InputError(f"img_in takes {width} inputs and c_embedder {emb.in_features}; DSD needs a FLUX model with "
                         f"{x_width} (16 latent channels x 2x2 patches).")
    if hidden != emb.hidden_size:
        raise InputError(f"the FLUX model's hidden size is {hidden} but the c_embedder's is {emb.hidden_size}: the "
                         f"DSD file ({os.path.basename(emb.source)}) belongs to another model size; use FLUX.1-dev "
                         "with the DSD transformer or patch made from it.")
    weight = torch.zeros(hidden, 2 * x_width, dtype=torch.float32)
    weight[:, x_width:] = emb.weight.float()
    return ImgInPatch(weight, emb.bias.float().clone())


# ---------------------------------------------------------------------------------------------- schedule
def reference_sigmas(steps: int, image_seq_len: int, scheduler_config: dict | None = None) -> torch.Tensor:
    """The reference's sigmas (``steps + 1`` values, last 0): ``linspace(1, 1/N, N)`` shifted with ``mu``.

    Computed by diffusers' ``FlowMatchEulerDiscreteScheduler`` with the FLUX.1-dev config, exactly as the reference
    pipeline does (float32), so ComfyUI's samplers step through the same sigmas bit for bit.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .canvas import compute_mu
    from .single_file.configs import shipped_config

    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}.")
    config = dict(scheduler_config or shipped_config("scheduler"))
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_mu(image_seq_len, config))
    return scheduler.sigmas.to(torch.float32).cpu()


# ---------------------------------------------------------------------------------------------- comparison
@dataclass
class Comparison:
    """Result of :func:`compare_transformers` (names are diffusers names)."""

    a: str
    b: str
    compared: int = 0
    differing: list = field(default_factory=list)  # (name, max abs diff)
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    shape_mismatch: list = field(default_factory=list)
    dtypes: tuple = ("", "")

    @property
    def equal_apart_from_c_embedder(self) -> bool:
        extra_a = [n for n in self.only_a if not n.startswith("c_embedder.")]
        extra_b = [n for n in self.only_b if not n.startswith("c_embedder.")]
        return not (self.differing or extra_a or extra_b or self.shape_mismatch) and self.compared > 0

    def summary(self) -> str:
        lines = [f"A: {self.a} ({self.dtypes[0]})", f"B: {self.b} ({self.dtypes[1]})",
                 f"compared {self.compared} tensors (diffusers names)"]
        if self.only_a:
            lines.append(f"only in A: {len(self.only_a)} ({', '.join(self.only_a[:4])})")
        if self.only_b:
            lines.append(f"only in B: {len(self.only_b)} ({', '.join(self.only_b[:4])})")
        for name, shapes in self.shape_mismatch[:5]:
            lines.append(f"shape differs: {name} {shapes}")
        if self.differing:
            worst = max(self.differing, key=lambda d: d[1])
            lines.append(f"values differ: {len(self.differing)} tensors, e.g. {self.differing[0][0]}; largest "
                         f"difference {worst[1]:.3g} in {worst[0]}")
        if self.equal_apart_from_c_embedder:
            lines.append("EQUAL apart from c_embedder: use this FLUX file + the c_embedder patch + the DSD LoRA.")
        else:
            lines.append("NOT equal apart from c_embedder: keep the DSD transformer file.")
        return "\n".join(lines)


class _TransformerFile:
    """A FLUX/DSD transformer file in either layout, read one stored tensor at a time under diffusers names."""

    def __init__(self, path):
        self.ck = Checkpoint(path, "FLUX transformer", FLUX_HINT)
        names = self.ck.names
        bfl, diff = find_prefix(names, BFL_ANCHOR), find_prefix(names, DIFFUSERS_ANCHOR)
        if bfl is None and diff is None:
            raise self.ck.wrong_file(BFL_ANCHOR)
        self.layout, prefix = ("bfl", bfl) if bfl is not None else ("diffusers", diff)
        self.sources = {n: n[len(prefix):] for n in names if n.startswith(prefix)}
        for n in names:  # c_embedder may sit under another prefix
            if n.endswith("c_embedder.weight") or n.endswith("c_embedder.bias"):
                self.sources[n] = "c_embedder." + n.rsplit(".", 1)[1]
        self.inner = None
        if self.layout == "bfl":
            img_in = prefix + "img_in.weight"
            if img_in not in names:
                raise ModelFormatError(f"{self.ck.path} has no {img_in}; pass {FLUX_HINT}.")
            self.inner = self.ck.shape(img_in)
        self.index = {}  # diffusers name -> stored name
        for stored, rel in self.sources.items():
            for d in self._convert(rel, self.ck.meta_state([stored])[stored]):
                self.index[d] = stored
        self.dtypes = sorted({self.ck.stored_dtype(n) for n in self.sources})

    def _convert(self, rel: str, t: torch.Tensor) -> dict:
        if self.layout == "diffusers" or rel.startswith("c_embedder."):
            return {rel: t}
        state = {rel: t}
        if rel != "img_in.weight":
            state["img_in.weight"] = torch.empty(self.inner, device="meta")
        out = bfl_to_diffusers(state, self.ck.path)
        if rel != "img_in.weight":
            out.pop("x_embedder.weight")
        return out

    def parts(self, stored: str) -> dict:
        return self._convert(self.sources[stored], self.ck.get(stored, torch.float32))


def compare_transformers(path_a, path_b, progress=None) -> Comparison:
    """Compare two transformer files value by value, streaming (one stored tensor of each in memory at a time).

    Layouts may differ (diffusers vs BFL/ComfyUI; fused BFL tensors are split as diffusers names). Values are compared
    after upcasting to float32, so a bf16 file equals its float32 copy only if the values are representable.
    ``progress(done, total)`` is called after each tensor of A.
    """
    a, b = _TransformerFile(path_a), _TransformerFile(path_b)
    result = Comparison(a.ck.path, b.ck.path, dtypes=("/".join(a.dtypes), "/".join(b.dtypes)))
    result.only_a = sorted(set(a.index) - set(b.index))
    result.only_b = sorted(set(b.index) - set(a.index))
    cache: dict = {}
    stored_a = list(dict.fromkeys(a.index[n] for n in sorted(a.index)))
    for i, stored in enumerate(stored_a):
        for name, ta in a.parts(stored).items():
            if name not in b.index:
                continue
            sb = b.index[name]
            if sb not in cache:
                cache.clear()  # one stored tensor of B at a time
                cache[sb] = b.parts(sb)
            tb = cache[sb][name]
            result.compared += 1
            if ta.shape != tb.shape:
                result.shape_mismatch.append((name, (tuple(ta.shape), tuple(tb.shape))))
            elif not torch.equal(ta, tb):
                result.differing.append((name, float((ta - tb).abs().max())))
        if progress is not None:
            progress(i + 1, len(stored_a))
    return result
