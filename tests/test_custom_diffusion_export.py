"""``custom-diffusion export-comfyui``: the concept's deltas as a clean LoRA (only keys a LoRA loader knows), text-rows
deltas left out with a note, each token as a textual-inversion embedding. ComfyUI itself loads these files in
``tests/engine/test_engine_concept_lora.py``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dsd_core.custom_diffusion.export import export_comfyui, lora_tensors
from dsd_core.custom_diffusion.parameters import ParameterSet
from dsd_core.custom_diffusion.tiny import tiny_concept
from dsd_core.errors import InputError


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    from dsd_core.tiny import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def _concept(transformer, **params):
    return tiny_concept(transformer, 32, params=ParameterSet(**params), kind="flux")


def test_lora_keys_and_values(transformer):
    concept = _concept(transformer, preset="kv+q+out", rank=2, alpha=4, context_embedder=True)
    tensors, left_out = lora_tensors(concept)
    assert not left_out
    assert all(k.startswith("transformer.") for k in tensors)  # nothing ComfyUI would report as not loaded
    assert len(tensors) == 2 * len(concept.deltas.layers)
    for layer in concept.deltas.layers:
        key = f"transformer.{layer.target.name}"
        dense = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]  # alpha folded in, no .alpha key
        assert torch.allclose(dense, layer.matrix(), atol=1e-6)
    assert "transformer.context_embedder.lora_A.weight" in tensors


def test_full_deltas_become_diff_patches_and_text_rows_are_left_out(transformer, tmp_path, capsys):
    concept = _concept(transformer, preset="kv", form="full", single_text_kv=True)
    report = export_comfyui(concept, str(tmp_path / "l.safetensors"), embeddings_dir=str(tmp_path / "emb"))
    tensors = load_file(str(tmp_path / "l.safetensors"))
    assert sorted(tensors) == sorted(f"transformer.transformer_blocks.{i}.attn.{p}.diff"
                                     for i in range(2) for p in ("add_k_proj", "add_v_proj"))
    assert report.left_out == [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_k", "to_v")]
    assert "no LoRA can express them" in report.text()
    emb = load_file(str(tmp_path / "emb" / "new1.safetensors"))
    assert list(emb) == ["t5xxl"] and torch.equal(emb["t5xxl"], concept.tokens.embeddings["t5"].detach()[:1])
    assert "embedding:new1" in report.text()

    from dsd_core.custom_diffusion.delta_file import ConceptFile
    from dsd_core.custom_diffusion.parameters import ConceptDeltas

    mixed = _concept(transformer, preset="kv", single_text_kv=True)
    only_text = ConceptFile(ConceptDeltas([la for la in mixed.deltas.layers if la.target.rows == "text"]),
                            mixed.tokens, mixed.probe, mixed.info)
    with pytest.raises(InputError, match="text-rows"):
        export_comfyui(only_text, str(tmp_path / "t.safetensors"))


def test_cli(transformer, tmp_path, capsys):
    from dsd_core.cli import main

    path = _concept(transformer, rank=2).save(str(tmp_path / "c.safetensors"))
    assert main(["custom-diffusion", "export-comfyui", path, "--lora", str(tmp_path / "loras" / "c.safetensors"),
                 "--embeddings", str(tmp_path / "embeddings")]) == 0
    out = capsys.readouterr().out
    assert "4 layers" in out and "embedding:new1" in out
    assert all(k.startswith("transformer.") for k in load_file(str(tmp_path / "loras" / "c.safetensors")))
    assert (tmp_path / "embeddings" / "new1.safetensors").is_file()
