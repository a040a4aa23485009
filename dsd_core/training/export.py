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
is self-contained (``save_pretrained`` of the transformer with the trained ``c_embedder``) and can be moved anywhere.
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
                   transformer_config: dict, standalone: bool = False, dtype: torch.dtype = torch.bfloat16) -> str:
    """Write (or replace) the model folder's ``transformer/`` and LoRA; returns ``output_dir``.

    ``transformer/`` links ``base_transformer`` and holds the trained ``c_embedder``; ``standalone`` then replaces
    it with the full transformer (:func:`materialize_transformer`).
    """
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    save_lora_file(os.path.join(output_dir, LORA_FILENAME), lora, lora_config)
    final = os.path.join(output_dir, TRANSFORMER_DIR)
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".tmp-transformer-")
    try:
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer_config.items()}
        config["_class_name"] = "DSDTransformer2DModel"
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
        atomic_save_file({f"c_embedder.{k}": v.to(dtype) for k, v in c_embedder.items()},
                         os.path.join(tmp, LINKED_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, LINK_FILE), "w", encoding="utf-8") as fh:
            json.dump({"base_transformer": os.path.abspath(base_transformer), "weights": LINKED_WEIGHTS,
                       "note": "the trained c_embedder is in weights; every other transformer weight is "
                               "base_transformer's (not copied). Move or delete that folder and this model no "
                               "longer loads; export with standalone for a self-contained copy."}, fh, indent=2)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if standalone:
        materialize_transformer(final, dtype)
    return output_dir


def materialize_transformer(folder: str, dtype: torch.dtype | None = None) -> None:
    """Replace a linked ``transformer/`` folder by a self-contained one (``save_pretrained`` of the loaded model)."""
    from ..transformer import DSDTransformer2DModel, read_transformer_link

    if read_transformer_link(folder) is None:
        return
    model = DSDTransformer2DModel.from_pretrained(folder, dtype=dtype)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(folder)), prefix=".tmp-transformer-")
    try:
        model.save_pretrained(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model(source: str, destination: str, standalone: bool = False) -> str:
    """Copy a trained DSD model folder (LoRA + ``transformer/``) to ``destination`` (replaced if it exists).

    A linked ``transformer/`` keeps its link (a few kB are copied); ``standalone`` writes the full transformer
    instead, so the copy no longer depends on the base transformer folder.
    """
    from ..errors import ModelNotFoundError

    source, destination = os.path.abspath(source), os.path.abspath(destination)
    if source == destination:
        raise ModelNotFoundError(f"{destination} is the model folder itself; pick another name.")
    lora = os.path.join(source, LORA_FILENAME)
    src_transformer = os.path.join(source, TRANSFORMER_DIR)
    if not (os.path.isfile(lora) and os.path.isdir(src_transformer)):
        raise ModelNotFoundError(f"{source} is not a DSD model folder (needs {TRANSFORMER_DIR}/ and {LORA_FILENAME}).")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-model-")
    try:
        shutil.copy2(lora, os.path.join(tmp, LORA_FILENAME))
        shutil.copytree(src_transformer, os.path.join(tmp, TRANSFORMER_DIR))
        if standalone:
            materialize_transformer(os.path.join(tmp, TRANSFORMER_DIR))
        replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
