"""Writing a trained DSD model folder that ``python -m dsd_core generate --model`` and the loader nodes accept.

Layout (what :func:`dsd_core.loading.load_pipeline` reads)::

    OUTPUT/pytorch_lora_weights.safetensors   the LoRA: diffusers keys (``transformer.…lora_A.weight``), the peft
                                              adapter config (rank, alpha, targets) in the ``lora_adapter_metadata``
                                              header, so ``load_lora_weights`` restores alpha exactly
    OUTPUT/transformer/config.json            the DSD transformer config
    OUTPUT/transformer/c_embedder.safetensors the trained condition layer (``c_embedder.weight``/``.bias``)
    OUTPUT/transformer/dsd_link.json          {"base_transformer": "<folder>"}: every other weight is that folder's

When only the LoRA and ``c_embedder`` changed, the 24 GB base transformer is therefore referenced, not copied
(:func:`dsd_core.transformer.read_transformer_link` resolves it when loading). With ``full_transformer`` the folder
is self-contained (``save_pretrained`` of the transformer without its LoRA) and can be moved anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..loading import LORA_FILENAME, TRANSFORMER_DIR
from ..transformer import LINK_FILE, LINKED_WEIGHTS
from .io import atomic_save_file, replace_dir


def save_lora_file(path: str, lora: dict, adapter_config: dict) -> None:
    """The LoRA as diffusers writes it (``FluxPipeline.save_lora_weights`` with the adapter metadata), atomically."""
    from diffusers import FluxPipeline

    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-lora-") as tmp:
        FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=lora,
                                       transformer_lora_adapter_metadata=adapter_config,
                                       weight_name=os.path.basename(path))
        os.replace(os.path.join(tmp, os.path.basename(path)), path)


def save_dsd_model(output_dir: str, lora: dict, lora_config: dict, c_embedder: dict, base_transformer: str,
                   transformer_config: dict, full_transformer: torch.nn.Module | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> str:
    """Write (or replace) the model folder's ``transformer/`` and LoRA; returns ``output_dir``."""
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    save_lora_file(os.path.join(output_dir, LORA_FILENAME), lora, lora_config)
    final = os.path.join(output_dir, TRANSFORMER_DIR)
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-transformer-")
    try:
        if full_transformer is not None:
            _save_full(full_transformer, tmp, dtype)
        else:
            config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer_config.items()}
            config["_class_name"] = "DSDTransformer2DModel"
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
            atomic_save_file({f"c_embedder.{k}": v.to(dtype) for k, v in c_embedder.items()},
                             os.path.join(tmp, LINKED_WEIGHTS), metadata={"format": "pt"})
            with open(os.path.join(tmp, LINK_FILE), "w", encoding="utf-8") as fh:
                json.dump({"base_transformer": os.path.abspath(base_transformer), "weights": LINKED_WEIGHTS,
                           "note": "the trained c_embedder is in weights; every other transformer weight is "
                                   "base_transformer's (not copied). Move or delete that folder and this model "
                                   "no longer loads; train with export_full_transformer for a standalone copy."},
                          fh, indent=2)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _save_full(transformer, folder: str, dtype: torch.dtype) -> None:
    """``save_pretrained`` of the transformer's base weights + c_embedder (the LoRA stays in its own file)."""
    state = {k: v for k, v in transformer.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer.", "."): v.detach().to(dtype).cpu().contiguous() for k, v in state.items()}
    transformer.save_config(folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    config["_class_name"] = "DSDTransformer2DModel"
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="5GB")
