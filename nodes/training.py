"""DSD training nodes, in ComfyUI's own training style (``comfy_extras/nodes_train.py``): a dataset node, a train
node that returns the trained model (for the DSD Sampler in the same graph) with its loss map, a save node and a loss
plot. Thin adapters over :mod:`dsd_core.training`; the loop is the same Trainer the CLI runs.

The run folder is ``models/dsd/<output_name>``: the trained model (listed by the DSD Model Loader), its checkpoints
(``resume`` continues from the newest) and logs. Cancel stops after the current step, writes a checkpoint and stops
the graph.
"""

from __future__ import annotations

import logging
import os

from . import _comfy

logger = logging.getLogger(__name__)
START_FROM_FLUX = "FLUX (fresh c_embedder + LoRA)"


def _help(cls, name: str) -> str:
    import dataclasses

    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


class DSDTrainingDataset:
    DESCRIPTION = ("A paired dataset for DSD training: a folder with metadata.jsonl (one {\"reference\", \"target\", "
                   "\"caption\"} line per pair, paths relative to the folder) or local Hugging Face parquet/arrow "
                   "files with a column mapping. Every pair is checked here; bad items are listed by name.")
    CATEGORY = "DSD/training"
    FUNCTION = "load"
    RETURN_TYPES = ("DSD_TRAINING_DATA",)
    RETURN_NAMES = ("dataset",)

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.training.config import TrainConfig

        return {"required": {
            "folder": ("STRING", {"default": "dsd_pairs", "tooltip": "Dataset folder (absolute, or relative to "
                                                                     "ComfyUI's input folder). " + _help(TrainConfig, "data")}),
            "reference_column": ("STRING", {"default": "reference", "tooltip": _help(TrainConfig, "reference_column")}),
            "target_column": ("STRING", {"default": "target", "tooltip": _help(TrainConfig, "target_column")}),
            "caption_column": ("STRING", {"default": "caption", "tooltip": _help(TrainConfig, "caption_column")}),
            "min_image_size": ("INT", {"default": 256, "min": 16, "max": 4096,
                                       "tooltip": _help(TrainConfig, "min_image_size")}),
        }}

    def load(self, folder, reference_column, target_column, caption_column, min_image_size):
        from dsd_core.training.data import load_pairs, validate_pairs

        path = _comfy.input_path(folder)
        records = load_pairs(path, reference_column, target_column, caption_column)
        validate_pairs(records, min_size=min_image_size, source=path)
        return ({"data": path, "reference_column": reference_column, "target_column": target_column,
                 "caption_column": caption_column, "min_image_size": min_image_size, "pairs": len(records)},)


class DSDTrainLoRA:
    DESCRIPTION = (
        "Trains DSD (c_embedder + a transformer LoRA) on paired images, from FLUX or continuing a DSD model. The "
        "progress bar shows the loss and the validation images (reference | target | generated). Cancel saves a "
        "checkpoint first; run again with resume on to continue. The trained model goes to models/dsd/<output_name> "
        "(the base transformer is linked, not copied) and out of this node for the DSD Sampler."
    )
    CATEGORY = "DSD/training"
    FUNCTION = "train"
    RETURN_TYPES = ("DSD_MODEL", "LOSS_MAP", "STRING", "INT")
    RETURN_NAMES = ("dsd_model", "loss", "model_folder", "steps")
    OUTPUT_TOOLTIPS = ("The trained model (loads when a DSD node first uses it).",
                       "The loss per step, for DSD Plot Loss.",
                       "Folder of the trained model (models/dsd/<output_name>).",
                       "Steps trained so far.")

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.model_store import DEFAULT_BASE_NAME, list_base_models, list_dsd_models
        from dsd_core.training.config import LR_SCHEDULERS, OPTIMIZERS, TrainConfig
        from dsd_core.training.methods.dsd_lora import LORA_TARGET_PRESETS, DSDLoRAOptions

        T, O = TrainConfig, DSDLoRAOptions
        bases = list_base_models(_comfy.folder_roots(_comfy.BASE_FOLDER))
        return {
            "required": {
                "dataset": ("DSD_TRAINING_DATA",),
                "base": ([DEFAULT_BASE_NAME] + [b for b in bases if b != DEFAULT_BASE_NAME],
                         {"default": DEFAULT_BASE_NAME, "tooltip": "FLUX.1-dev diffusers folder under models/diffusers."}),
                "start_from": ([START_FROM_FLUX] + list_dsd_models(_comfy.folder_roots(_comfy.DSD_FOLDER)),
                               {"default": START_FROM_FLUX,
                                "tooltip": "FLUX: the base folder's transformer/ with a zero c_embedder and a new LoRA; "
                                           "or a DSD model under models/dsd whose LoRA and c_embedder are continued."}),
                "output_name": ("STRING", {"default": "my_dsd", "tooltip": "Folder under models/dsd for the model, "
                                                                           "its checkpoints and logs."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": _help(T, "max_steps")}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "tooltip": _help(T, "lr")}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": _help(T, "batch_size")}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                                  "tooltip": _help(T, "gradient_accumulation")}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": _help(O, "rank")}),
                "alpha": ("FLOAT", {"default": 32.0, "min": 0.01, "max": 4096.0, "step": 1.0,
                                    "tooltip": _help(O, "alpha")}),
                "lora_targets": (list(LORA_TARGET_PRESETS), {"default": "attention", "tooltip": _help(O, "lora_targets")}),
                "panel_size": ("INT", {"default": 512, "min": 16, "max": 1024, "step": 16,
                                       "tooltip": _help(T, "panel_size")}),
                "base_weights": (["native", "fp8"], {"default": "native", "tooltip": _help(T, "base_weights")}),
                "run_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                     "tooltip": _help(T, "seed") + " Keep it when resuming."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue from the newest checkpoint in the "
                                                                   "output folder if there is one."}),
            },
            "optional": {
                "checkpoint_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000,
                                             "tooltip": _help(T, "checkpoint_every")}),
                "validate_every": ("INT", {"default": 250, "min": 0, "max": 1_000_000,
                                           "tooltip": _help(T, "validate_every")}),
                "validation_steps": ("INT", {"default": 28, "min": 1, "max": 100, "tooltip": _help(T, "validation_steps")}),
                "optimizer": (list(OPTIMIZERS), {"default": "adamw", "tooltip": _help(T, "optimizer")}),
                "lr_scheduler": (list(LR_SCHEDULERS), {"default": "constant", "tooltip": _help(T, "lr_scheduler")}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": _help(T, "gradient_checkpointing")}),
                "condition_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                                "tooltip": _help(O, "condition_dropout")}),
                "caption_dropout": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": _help(O, "caption_dropout")}),
                "dtype": (["auto", "bfloat16", "float16", "float32"], {"default": "auto", "tooltip": _help(T, "dtype")}),
            },
        }

    def train(self, dataset, base, start_from, output_name, steps, learning_rate, batch_size, gradient_accumulation,
              rank, alpha, lora_targets, panel_size, base_weights, run_seed, resume, checkpoint_every=250,
              validate_every=250, validation_steps=28, optimizer="adamw", lr_scheduler="constant", gradient_checkpointing=True,
              condition_dropout=0.1, caption_dropout=0.1, dtype="auto"):
        import torch

        from dsd_core.errors import InputError
        from dsd_core.model_store import LazyPipeline, PipelineSpec
        from dsd_core.training import Trainer, TrainConfig, get_method
        from dsd_core.training.methods.dsd_lora import DSDLoRAOptions

        from .loader import _resolve

        name = output_name.strip()
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise InputError(f"output_name {output_name!r} must be a plain folder name (created under models/dsd).")
        roots = _comfy.folder_roots(_comfy.DSD_FOLDER)
        if not roots:
            raise InputError("ComfyUI has no models/dsd folder registered; restart ComfyUI with the pack installed.")
        root = next((r for r in roots if os.path.isdir(r)), roots[0])  # an existing models/dsd folder first
        output = os.path.join(root, name)
        base_dir = _resolve(base, _comfy.BASE_FOLDER, False, "base")
        source = {}
        if start_from == START_FROM_FLUX:
            source["from_flux"] = os.path.join(base_dir, "transformer")
        else:
            source["model"] = _resolve(start_from, _comfy.DSD_FOLDER, False, "dsd")
        device = _comfy.torch_device()
        config = TrainConfig(
            data=dataset["data"], reference_column=dataset["reference_column"],
            target_column=dataset["target_column"], caption_column=dataset["caption_column"],
            min_image_size=dataset["min_image_size"], base=base_dir, output=output, max_steps=steps,
            lr=learning_rate, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            panel_size=panel_size, base_weights=base_weights, seed=run_seed, resume="latest" if resume else "",
            checkpoint_every=checkpoint_every, validate_every=validate_every, validation_steps=validation_steps,
            optimizer=optimizer, lr_scheduler=lr_scheduler, gradient_checkpointing=gradient_checkpointing,
            dtype=dtype, cpu=device.startswith("cpu"), local_files_only=True, **source)
        options = DSDLoRAOptions(rank=rank, alpha=alpha, lora_targets=lora_targets,
                                 condition_dropout=condition_dropout, caption_dropout=caption_dropout)
        method = get_method("dsd-lora")(config, options)
        bar = _comfy.progress_bar(steps)
        last_preview = []

        def on_step(progress):
            if progress.images:
                last_preview[:] = progress.images[:1]
            if bar is not None:
                preview = ("JPEG", last_preview[0], 512) if last_preview else None
                bar.update_absolute(progress.step, progress.total_steps, preview)
            logger.info("DSD training step %d/%d loss %.4f (%.2f s/step)", progress.step, progress.total_steps,
                        progress.loss, progress.seconds_per_step)

        def should_stop() -> bool:
            try:
                _comfy.check_interrupt()
            except Exception:
                return True
            return False

        _comfy.make_room(device)
        # ComfyUI runs nodes under inference mode; training needs autograd
        with torch.inference_mode(False), torch.enable_grad():
            try:
                result = Trainer(config, method, callback=on_step, should_stop=should_stop,
                                 handle_sigint=False).train()
            finally:
                del method  # free the training copy of the model before the sampler loads the result
        if result.interrupted:
            _comfy.raise_interrupted()
        handle = LazyPipeline(PipelineSpec(base=base_dir, model=output, dtype=None if dtype == "auto" else dtype,
                                           device=device, memory="16gb" if base_weights == "fp8" else "full"))
        return (handle, {"steps": [s for s, _ in result.losses], "loss": [v for _, v in result.losses]},
                output, result.step)


class DSDSaveTrainedModel:
    DESCRIPTION = ("Copies a trained DSD model folder to models/dsd/<name> (e.g. to keep a snapshot). standalone "
                   "writes the full transformer too (24 GB at full size) so the copy no longer needs the base "
                   "transformer folder.")
    CATEGORY = "DSD/training"
    FUNCTION = "save"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("model_folder",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_folder": ("STRING", {"forceInput": True, "tooltip": "model_folder of DSD Train."}),
            "name": ("STRING", {"default": "my_dsd_snapshot", "tooltip": "Folder name under models/dsd."}),
            "standalone": ("BOOLEAN", {"default": False, "tooltip": "Write the full transformer (no link)."}),
        }}

    def save(self, model_folder, name, standalone):
        from dsd_core.errors import InputError
        from dsd_core.training.export import copy_model

        roots = _comfy.folder_roots(_comfy.DSD_FOLDER)
        if not name.strip() or "/" in name or os.sep in name or not roots:
            raise InputError(f"name {name!r} must be a plain folder name (saved under models/dsd).")
        root = next((r for r in roots if os.path.isdir(r)), roots[0])
        return (copy_model(model_folder, os.path.join(root, name.strip()), standalone=standalone),)


class DSDPlotLoss:
    DESCRIPTION = "Draws the training loss (raw and smoothed) as an image."
    CATEGORY = "DSD/training"
    FUNCTION = "plot"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"loss": ("LOSS_MAP",),
                             "width": ("INT", {"default": 800, "min": 200, "max": 4096}),
                             "height": ("INT", {"default": 480, "min": 150, "max": 4096})}}

    def plot(self, loss, width, height):
        from dsd_core.image import pil_to_tensor
        from dsd_core.training.plot import loss_plot

        steps = loss.get("steps") or list(range(1, len(loss["loss"]) + 1))
        return (pil_to_tensor(loss_plot(list(zip(steps, loss["loss"])), width, height)),)


NODE_CLASS_MAPPINGS = {"DSDTrainingDataset": DSDTrainingDataset, "DSDTrainLoRA": DSDTrainLoRA,
                       "DSDSaveTrainedModel": DSDSaveTrainedModel, "DSDPlotLoss": DSDPlotLoss}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDTrainingDataset": "DSD Training Dataset", "DSDTrainLoRA": "DSD Train (LoRA + c_embedder)",
                              "DSDSaveTrainedModel": "DSD Save Trained Model", "DSDPlotLoss": "DSD Plot Loss"}
