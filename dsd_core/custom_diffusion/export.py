"""A concept delta as files ComfyUI's stock nodes read: a LoRA for *LoraLoaderModelOnly* and, per modifier token, a
textual-inversion embedding for its FLUX text encoders.

The concept delta file itself also holds ``concept.*`` tensors (modifier tokens, base probe, text-rows deltas) that
ComfyUI's LoRA loader does not know: loaded as a LoRA it applies the ``transformer.*`` deltas but logs
``lora key not loaded: concept...`` for every other key. :func:`lora_tensors` keeps only what a standard LoRA
loader can express, in the keys ComfyUI's FLUX key map accepts (``transformer.<diffusers module>``):

* low-rank deltas on all rows -> ``transformer.<layer>.lora_A.weight`` / ``lora_B.weight`` (scale folded into
  ``lora_B``, no ``alpha`` key: ComfyUI and diffusers then use scale 1);
* full deltas on all rows -> ``transformer.<layer>.diff`` (ComfyUI's "diff" patch; diffusers' loader does not read
  it, use the concept delta with :func:`~.delta_file.apply_concept` there);
* text-rows deltas (``single_text_kv``: single-stream ``to_k`` / ``to_v`` acting on the text tokens only) -> left
  out: a LoRA patches a weight for every token, so no LoRA file can express them. They are reported.

Modifier tokens: ComfyUI's FLUX tokenizers read textual-inversion embeddings from ``models/embeddings`` when the
prompt says ``embedding:<name>`` (T5-XXL under the key ``t5xxl``, CLIP-L under ``clip_l``). :func:`embedding_tensors`
writes one file per token, named after it without the brackets (``<new1>`` -> ``new1.safetensors``, used as
``photo of a embedding:new1 cat``). ComfyUI's T5 then encodes the prompt as dsd_core encodes ``photo of a <new1>
cat`` when both pad to the same length (DSD Text Encode's ``t5_padding`` 512 does; ComfyUI's own encode pads to 256).
Without a CLIP-L embedding in the concept, ComfyUI's CLIP-L tokenizer takes the file's T5 vector, which its encoder
refuses by width ("shape mismatch ... ignored", per ComfyUI's code), so the word is dropped there, while dsd_core
feeds CLIP-L the literal text ``<new1>``: the pooled CLIP vector differs a little.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..files import save_safetensors
from .delta_file import ConceptFile

#: ComfyUI's embedding keys per encoder of a concept file
EMBEDDING_KEYS = {"t5": "t5xxl", "clip": "clip_l"}


@dataclass
class ExportReport:
    lora: str | None = None
    layers: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    embeddings: dict[str, str] = field(default_factory=dict)  # token -> file

    def text(self) -> str:
        lines = [f"ComfyUI LoRA {self.lora}: {len(self.layers)} layers (load with LoraLoaderModelOnly)"]
        if self.left_out:
            lines.append(f"left out (text-rows deltas, no LoRA can express them): {', '.join(self.left_out)}")
        for token, path in self.embeddings.items():
            lines.append(f"{token}: embedding {path} (write 'embedding:{embedding_name(token)}' in the prompt)")
        return "\n".join(lines)


def lora_tensors(concept: ConceptFile, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor],
                                                                                       list[str]]:
    """``(tensors, left_out)``: the deltas as ComfyUI LoRA keys, and the layers no LoRA can express."""
    out, left_out = {}, []
    for layer in concept.deltas.layers:
        name = layer.target.name
        if layer.target.rows != "all":
            left_out.append(name)
        elif layer.low_rank:
            out[f"transformer.{name}.lora_A.weight"] = layer.down.detach()
            out[f"transformer.{name}.lora_B.weight"] = layer.up.detach() * layer.scale
        else:
            out[f"transformer.{name}.diff"] = layer.weight.detach()
    return {k: v.to(dtype).cpu().contiguous() for k, v in out.items()}, left_out


def embedding_name(token: str) -> str:
    """``<new1>`` -> ``new1``: the file name (and the word after ``embedding:``)."""
    return token.strip("<>")


def embedding_tensors(concept: ConceptFile, token: str) -> dict[str, torch.Tensor]:
    """The embedding file of one modifier token: ``{"t5xxl": (1, 4096)}`` (+ ``"clip_l": (1, 768)``)."""
    if concept.tokens is None or token not in concept.token_names:
        raise InputError(f"the concept has no token {token}; it has {concept.token_names or 'none'}.")
    row = concept.token_names.index(token)
    return {EMBEDDING_KEYS[enc]: emb[row:row + 1].detach().float().cpu().contiguous()
            for enc, emb in concept.tokens.embeddings.items()}


def export_comfyui(concept: ConceptFile | str, lora_path: str, embeddings_dir: str | None = None,
                   dtype: torch.dtype = torch.float32) -> ExportReport:
    """Write the ComfyUI LoRA (and, with ``embeddings_dir``, one embedding file per token), atomically."""
    if isinstance(concept, (str, os.PathLike)):
        concept = ConceptFile.load(concept)
    if not str(lora_path).endswith(".safetensors"):
        raise InputError(f"{lora_path}: give the LoRA a .safetensors name.")
    tensors, left_out = lora_tensors(concept, dtype)
    if not tensors:
        raise InputError(f"nothing to export as a LoRA: every tuned layer ({', '.join(left_out)}) is a text-rows "
                         "delta, which no LoRA loader can express.")
    os.makedirs(os.path.dirname(os.path.abspath(lora_path)), exist_ok=True)
    meta = {"source": "dsd-custom-diffusion", "tokens": ",".join(concept.token_names)}
    save_safetensors(tensors, str(lora_path), metadata=meta)
    report = ExportReport(str(lora_path), sorted({k.split(".lora_")[0].rsplit(".diff", 1)[0][len("transformer."):]
                                                  for k in tensors}), left_out)
    if embeddings_dir is not None:
        os.makedirs(embeddings_dir, exist_ok=True)
        for token in concept.token_names:
            path = os.path.join(embeddings_dir, embedding_name(token) + ".safetensors")
            save_safetensors(embedding_tensors(concept, token), path)
            report.embeddings[token] = path
    return report


__all__ = ["export_comfyui", "lora_tensors", "embedding_tensors", "embedding_name", "ExportReport"]
