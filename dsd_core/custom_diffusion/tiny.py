"""A random concept delta for the tiny model set (``dsd_core.tiny``): for tests and demos of the concept nodes and
workflows without training. Its effect is noise, like the tiny models' images."""

from __future__ import annotations

import os

import torch

from .delta_file import ConceptFile, base_probe
from .parameters import ConceptDeltas, ParameterSet
from .tokens import ModifierTokens


def tiny_concept(transformer, t5_dim: int, token: str = "<new1>", word: str = "toy", seed: int = 0,
                 params: ParameterSet = ParameterSet(rank=2), kind: str = "dsd") -> ConceptFile:
    """A concept with random non-zero deltas on ``transformer`` and a random ``token`` embedding."""
    g = torch.Generator().manual_seed(seed)
    deltas = ConceptDeltas.create(transformer, params, seed=seed)
    with torch.no_grad():
        for layer in deltas.layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tokens = ModifierTokens([token], [word], {"t5": torch.randn(1, t5_dim, generator=g)})
    return ConceptFile(deltas, tokens, base_probe(transformer, deltas.names),
                       {"base_kind": kind, "concepts": [{"token": token, "instance_prompt": f"photo of a {token} {word}"}]})


def write_tiny_concept(path: str, model_dir: str, base_dir: str, seed: int = 0) -> str:
    """Write a random concept for the tiny DSD model in ``model_dir`` (T5 size from ``base_dir``) to ``path``."""
    import json

    from ..transformer import DSDTransformer2DModel

    transformer = DSDTransformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
    with open(os.path.join(base_dir, "text_encoder_2", "config.json"), encoding="utf-8") as fh:
        t5_dim = json.load(fh)["d_model"]
    return tiny_concept(transformer, t5_dim, seed=seed).save(path)
