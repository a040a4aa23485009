"""Training: one engine for every method that turns data into a model.

* :mod:`.config` -- :class:`TrainConfig` (engine options; fields are CLI flags and YAML keys);
* :mod:`.data` -- paired datasets (``metadata.jsonl`` folders, local Hugging Face parquet/arrow) and validation;
* :mod:`.cache` -- VAE latents and text embeddings cached on disk, keyed by content and model;
* :mod:`.engine` -- :class:`Trainer`: accelerate, optimiser, schedule, accumulation, checkpoints, resume, logging;
* :mod:`.methods` -- what varies: :class:`~.methods.base.TrainingMethod` and the methods (``dsd-lora``, ...);
* :mod:`.export` -- the trained DSD model folder; :mod:`.memory_estimate` -- the peak-memory estimate.

Quick use::

    from dsd_core.training import TrainConfig, Trainer, get_method
    from dsd_core.training.methods.dsd_lora import DSDLoRAOptions

    cfg = TrainConfig(data="pairs/", base="FLUX.1-dev", from_flux="FLUX.1-dev/transformer", output="out/")
    method = get_method("dsd-lora")(cfg, DSDLoRAOptions(rank=32))
    result = Trainer(cfg, method).train()      # out/ is now a DSD model folder
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

#: public name -> submodule; imported on first use, so ``import dsd_core.training`` (and the CLI's parser) stays light
_EXPORTS = {"TrainConfig": "config", "TrainingCancelled": "engine", "TrainProgress": "engine", "TrainResult": "engine",
            "Trainer": "engine", "METHODS": "methods", "TrainingMethod": "methods", "get_method": "methods"}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
