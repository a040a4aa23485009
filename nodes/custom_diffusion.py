"""Custom Diffusion nodes: tune a concept from a few images, merge, compress, load and apply concept deltas.

Thin adapters over :mod:`dsd_core.custom_diffusion`. Concept deltas live in ``models/dsd_concepts`` (``.safetensors``);
a ``DSD_CONCEPT`` value is the path of one such file. Training writes its run folder (checkpoints, logs, class
images) to ``models/dsd_concepts/runs/<name>`` and the delta to ``models/dsd_concepts/<name>.safetensors``.
"""

from __future__ import annotations

import logging
import os
import shutil

from . import _comfy

logger = logging.getLogger(__name__)

CONCEPT_FOLDER = "dsd_concepts"
CONCEPT = "DSD_CONCEPT"


def _concept_root() -> str:
    _comfy.register_folder(CONCEPT_FOLDER)
    roots = _comfy.folder_roots(CONCEPT_FOLDER)
    if not roots:
        raise RuntimeError("no models/dsd_concepts folder is known; run inside ComfyUI or register one.")
    os.makedirs(roots[0], exist_ok=True)
    return roots[0]


def _out_path(name: str) -> str:
    from dsd_core.errors import InputError

    name = name.strip()
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise InputError(f"concept name {name!r} must be a plain file name such as 'my_cat'.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(_concept_root(), name)


def _bar_callback(total: int):
    bar = _comfy.progress_bar(total)

    def update(done, n):
        if bar is not None:
            bar.update_absolute(done, n)

    return update


class DSDConceptLoader:
    DESCRIPTION = "Picks a Custom Diffusion concept delta (.safetensors) from models/dsd_concepts."
    CATEGORY = "DSD/custom diffusion"
    FUNCTION = "load"
    RETURN_TYPES = (CONCEPT,)
    RETURN_NAMES = ("concept",)

    @classmethod
    def INPUT_TYPES(cls):
        _comfy.register_folder(CONCEPT_FOLDER)
        names = _comfy.filenames_with_extension(CONCEPT_FOLDER, ".safetensors")
        names = [n for n in names if not n.startswith("runs/")] or ["concept.safetensors"]
        return {"required": {"concept": (names, {"default": names[0]})}}

    def load(self, concept):
        from dsd_core.custom_diffusion.delta_file import ConceptFile
        from dsd_core.errors import ModelNotFoundError

        path = _comfy.full_path(CONCEPT_FOLDER, concept)
        if path is None:
            raise ModelNotFoundError(f"concept delta {concept} not found in models/dsd_concepts; train one with "
                                     "DSD Custom Diffusion Train or copy the file there.")
        ConceptFile.load(path)  # checks the format now, on this node
        return (path,)


class DSDCustomDiffusionTrain:
    DESCRIPTION = (
        "Tunes a concept from 4-20 images (Custom Diffusion on DSD or FLUX.1-dev): the text-side key/value "
        "projections (as LoRA) and a new word such as <new1>, with prior preservation from class images the model "
        "draws itself. Writes models/dsd_concepts/<name>.safetensors. Cancel saves a checkpoint; run again with "
        "resume on to continue. Uses its own copy of the model: unload others first on small GPUs.")
    CATEGORY = "DSD/custom diffusion"
    FUNCTION = "train"
    RETURN_TYPES = (CONCEPT, "IMAGE", "STRING")
    RETURN_NAMES = ("concept", "loss_plot", "summary")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.custom_diffusion.parameters import PRESETS
        from dsd_core.model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME, list_base_models, list_dsd_models

        models = [DEFAULT_MODEL_NAME] + [m for m in list_dsd_models(_comfy.folder_roots(_comfy.DSD_FOLDER))
                                         if m != DEFAULT_MODEL_NAME]
        bases = [DEFAULT_BASE_NAME] + [m for m in list_base_models(_comfy.folder_roots(_comfy.BASE_FOLDER))
                                       if m != DEFAULT_BASE_NAME]
        return {"required": {
            "name": ("STRING", {"default": "my_concept", "tooltip": "Output file models/dsd_concepts/<name>.safetensors"}),
            "instance_folder": ("STRING", {"default": "", "tooltip": "Folder with 4-20 images of the concept."}),
            "instance_prompt": ("STRING", {"default": "photo of a <new1> cat",
                                           "tooltip": "Names the concept: the new word, then its class word."}),
            "class_prompt": ("STRING", {"default": "", "tooltip": "Prompt of the class images (default: the "
                                                                  "instance prompt without the new word)."}),
            "mode": (["dsd", "flux"], {"default": "dsd", "tooltip": "dsd: tune the DSD model; flux: tune FLUX.1-dev "
                                                                    "text-to-image (needs the base's transformer/)."}),
            "model": (models, {"default": DEFAULT_MODEL_NAME}),
            "base": (bases, {"default": DEFAULT_BASE_NAME}),
            "preset": (list(PRESETS), {"default": "kv"}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 512}),
            "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "CD: 250-500 for one concept."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-6}),
            "resolution": ("INT", {"default": 512, "min": 32, "max": 1024, "step": 16}),
            "num_class_images": ("INT", {"default": 200, "min": 0, "max": 2000,
                                         "tooltip": "Class images for prior preservation (0: off)."}),
            "class_steps": ("INT", {"default": 28, "min": 1, "max": 100}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the last run of this name."}),
        }}

    def train(self, name, instance_folder, instance_prompt, class_prompt, mode, model, base, preset, rank, steps,
              learning_rate, resolution, num_class_images, class_steps, seed, resume):
        import torch

        from dsd_core.custom_diffusion.cli import CD_DEFAULTS
        from dsd_core.custom_diffusion.method import CustomDiffusionOptions, train_concepts
        from dsd_core.model_store import find_folder
        from dsd_core.training.config import TrainConfig
        from dsd_core.training.engine import TrainProgress

        from .loader import _resolve

        _comfy.check_interrupt()
        out = _out_path(name)
        run_dir = os.path.join(_concept_root(), "runs", os.path.basename(out)[:-len(".safetensors")])
        base_dir = _resolve(base, _comfy.BASE_FOLDER, False, "base")
        model_dir = _resolve(model, _comfy.DSD_FOLDER, False, "dsd") if mode == "dsd" else ""
        device = _comfy.torch_device()
        config = TrainConfig(**dict(CD_DEFAULTS, base=base_dir, model=model_dir, output=run_dir,
                                    cpu=not device.startswith("cuda"), max_steps=steps, lr=learning_rate,
                                    panel_size=resolution, min_image_size=min(256, resolution), seed=seed,
                                    resume="latest" if resume else "", local_files_only=True,
                                    checkpoint_every=min(250, steps)))
        options = CustomDiffusionOptions(
            mode=mode, instance_dir=instance_folder, instance_prompt=instance_prompt, class_prompt=class_prompt,
            preset=preset, rank=rank, with_prior_preservation=num_class_images > 0,
            num_class_images=max(1, num_class_images), class_steps=class_steps, class_seed=seed,
            class_cache=os.path.join(_concept_root(), "runs", "class_images"))
        _comfy.make_room(device)
        bar = _comfy.progress_bar(steps)
        losses = []

        def on_step(p: TrainProgress):
            losses.append((p.step, p.loss))
            logger.info("custom diffusion %s: step %d/%d loss %.4f", name, p.step, p.total_steps, p.loss)
            if bar is not None:
                bar.update_absolute(p.step, p.total_steps)

        result = train_concepts(config, options, callback=on_step, should_stop=_comfy.interrupted,
                                progress_bar=False, handle_sigint=False, class_progress=_bar_callback(1))
        if result.interrupted:
            _comfy.check_interrupt()  # ComfyUI shows the run as interrupted; the checkpoint is saved
            raise RuntimeError(f"training stopped at step {result.step}; checkpoint {result.last_checkpoint}")
        shutil.copyfile(os.path.join(run_dir, options.delta_name), out + ".tmp")
        os.replace(out + ".tmp", out)
        plot = torch.from_numpy(loss_plot(result.losses))[None]
        summary = (f"{name}: {result.step} steps, final loss {result.losses[-1][1]:.4f}, delta {out}"
                   if result.losses else f"{name}: delta {out}")
        return (out, plot, summary)


def loss_plot(losses, width: int = 512, height: int = 256):
    """A loss curve as a float32 image (H, W, 3) in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    if len(losses) >= 2:
        values = np.array([v for _, v in losses], dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or 1.0
        pts = [(8 + (width - 16) * k / (len(values) - 1), height - 8 - (height - 16) * (v - lo) / span)
               for k, v in enumerate(values)]
        draw.line(pts, fill=(30, 90, 200), width=2)
        draw.text((10, 6), f"loss {values[0]:.4f} -> {values[-1]:.4f}", fill=(0, 0, 0))
    return np.asarray(im, dtype=np.float32) / 255.0


class DSDCustomDiffusionMerge:
    DESCRIPTION = ("Merges two separately tuned concepts into one delta in closed form (Custom Diffusion's "
                   "constrained least squares): each keeps its own word; clashing words are renamed (<new1> of the "
                   "second becomes <new2>; the summary says so). Needs the model the concepts were tuned on.")
    CATEGORY = "DSD/custom diffusion"
    FUNCTION = "merge"
    RETURN_TYPES = (CONCEPT, "STRING")
    RETURN_NAMES = ("concept", "summary")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL",), "concept_a": (CONCEPT,), "concept_b": (CONCEPT,),
            "name": ("STRING", {"default": "merged_concepts"}),
            "ridge": ("FLOAT", {"default": 1e-3, "min": 1e-8, "max": 10.0, "step": 1e-4}),
        }}

    def merge(self, dsd_model, concept_a, concept_b, name, ridge):
        from dsd_core.custom_diffusion.delta_file import ConceptFile
        from dsd_core.custom_diffusion.merge import merge

        _comfy.check_interrupt()
        out = _out_path(name)
        pipe = dsd_model.get()

        bar_update = _bar_callback(1)

        def progress(done, total):
            _comfy.check_interrupt()
            bar_update(done, total)

        result = merge(pipe, [ConceptFile.load(concept_a), ConceptFile.load(concept_b)], ridge=ridge,
                       progress=progress)
        result.concept.save(out)
        renames = "; ".join(f"{k} -> {v}" for m in result.renames for k, v in m.items()) or "none"
        return (out, f"merged into {os.path.basename(out)}: words {', '.join(result.concept.token_names)} "
                     f"(renamed: {renames}); max error on the concepts' own words "
                     f"{max(result.constraint_error.values()):.1e}")


class DSDCustomDiffusionCompress:
    DESCRIPTION = ("Shrinks a concept delta by SVD: keeps the top singular values covering `energy` of their sum "
                   "(Custom Diffusion: 0.6), or a fixed rank (rank > 0). The summary gives the file sizes and the "
                   "weight error.")
    CATEGORY = "DSD/custom diffusion"
    FUNCTION = "compress"
    RETURN_TYPES = (CONCEPT, "STRING")
    RETURN_NAMES = ("concept", "summary")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "concept": (CONCEPT,), "name": ("STRING", {"default": "compressed_concept"}),
            "energy": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "0: use energy."}),
        }}

    def compress(self, concept, name, energy, rank):
        from dsd_core.custom_diffusion import compress as cmp
        from dsd_core.custom_diffusion.delta_file import ConceptFile

        out = _out_path(name)
        small, report = cmp.compress(ConceptFile.load(concept), energy=None if rank else energy, rank=rank or None)
        small.save(out)
        return (out, cmp.format_report(report, os.path.getsize(concept), os.path.getsize(out)))


class DSDApplyConcept:
    DESCRIPTION = ("Applies a concept delta to a loaded DSD model: samplers given the output model know the "
                   "concept's word (e.g. 'this <new1> cat wearing a hat'). The loaded model itself is unchanged, "
                   "so other branches of the graph still sample without it.")
    CATEGORY = "DSD/custom diffusion"
    FUNCTION = "apply"
    RETURN_TYPES = ("DSD_MODEL", "STRING")
    RETURN_NAMES = ("dsd_model", "words")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL",), "concept": (CONCEPT,),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05}),
        }}

    def apply(self, dsd_model, concept, strength):
        from dsd_core.custom_diffusion.apply import ConceptModel
        from dsd_core.custom_diffusion.delta_file import ConceptFile, check_base

        loaded = ConceptFile.load(concept)
        check_base(dsd_model.get().transformer, loaded.probe, os.path.basename(concept))  # fail here, not later
        inner = dsd_model.inner if isinstance(dsd_model, ConceptModel) else dsd_model
        before = dsd_model.concepts if isinstance(dsd_model, ConceptModel) else []
        return (ConceptModel(inner, before + [(loaded, strength)]), ", ".join(loaded.token_names))


NODE_CLASS_MAPPINGS = {"DSDConceptLoader": DSDConceptLoader, "DSDCustomDiffusionTrain": DSDCustomDiffusionTrain,
                       "DSDCustomDiffusionMerge": DSDCustomDiffusionMerge,
                       "DSDCustomDiffusionCompress": DSDCustomDiffusionCompress, "DSDApplyConcept": DSDApplyConcept}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDConceptLoader": "DSD Load Concept",
                              "DSDCustomDiffusionTrain": "DSD Custom Diffusion Train",
                              "DSDCustomDiffusionMerge": "DSD Custom Diffusion Merge",
                              "DSDCustomDiffusionCompress": "DSD Custom Diffusion Compress",
                              "DSDApplyConcept": "DSD Apply Concept"}
