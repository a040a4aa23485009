"""Distillation nodes: make teacher-painted pairs, build a pruned student, distil it (progress + loss), compare it
with the teacher side by side. Thin adapters over :mod:`dsd_core.distill.api`.

Students and distilled models are written to ``models/dsd/<name>/`` (a DSD model folder whose LoRA is fused), so the
DSD Model Loader lists them; teacher-painted pairs go to ``output/dsd_distill/``.
"""

from __future__ import annotations

import hashlib
import json
import os

from . import _comfy

PRESETS = ["half", "quarter", "full"]


def _model_paths(dsd_model) -> tuple[str, str]:
    from dsd_core.errors import InputError

    source = dsd_model.spec.source
    if not hasattr(source, "model"):
        raise InputError("distillation needs a DSD model loaded from folders (DSD Model Loader: models/dsd/<name> "
                         "with transformer/ + LoRA, and a diffusers FLUX.1-dev base), not from single files.")
    return source.model, source.base


def _dsd_root() -> str:
    roots = _comfy.folder_roots(_comfy.DSD_FOLDER)
    if not roots:
        raise RuntimeError("ComfyUI's models/dsd folder is unknown (not running inside ComfyUI?).")
    return roots[0]


def _name(name: str) -> str:
    from dsd_core.errors import InputError

    name = name.strip()
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise InputError(f"{name!r} is not a folder name; use a plain name like 'dsd_student_quarter'.")
    return name


def _device_dtype(dsd_model):
    """The loaded model's device and its dtype's name (``None`` for auto)."""
    from dsd_core.options import dtype_name

    dtype = dsd_model.spec.dtype
    return dsd_model.spec.device or _comfy.torch_device(), None if dtype is None else dtype_name(dtype)


def _bar(total: int):
    bar = _comfy.progress_bar(total)

    def update(done, _total=total):
        _comfy.check_interrupt()
        if bar is not None:
            bar.update_absolute(done, _total)

    return update


class DSDTeacherPairs:
    DESCRIPTION = ("Makes a paired dataset for distillation: for each reference image (a batch) and prompt (one per "
                   "line, used in turn) the teacher DSD model paints the right panel. The folder (metadata.jsonl + "
                   "PNGs) goes to output/dsd_distill/ and is reused when the inputs are the same.")
    CATEGORY = "DSD/distillation"
    FUNCTION = "make"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("dataset",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL", {"tooltip": "The teacher."}),
            "images": ("IMAGE", {"tooltip": "Reference images (a batch: one pair per image)."}),
            "prompts": ("STRING", {"multiline": True, "default": "this character playing soccer\n"
                                                                   "this character reading a book",
                                   "tooltip": "One prompt per line; pair k uses line k modulo the number of lines."}),
            "panel_size": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 16}),
            "steps": ("INT", {"default": 28, "min": 1, "max": 200}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
        }}

    def make(self, dsd_model, images, prompts, panel_size, steps, seed):
        from dsd_core.distill.data import write_teacher_pairs
        from dsd_core.errors import InputError
        from dsd_core.image import tensor_to_pil

        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise InputError("no prompts given; write one prompt per line.")
        refs = tensor_to_pil(images)
        key = hashlib.sha256(json.dumps([str(getattr(dsd_model.spec.source, "model", dsd_model.spec.source)), lines, panel_size, steps, seed]).encode()
                             + images.numpy().tobytes()).hexdigest()[:12]
        out = os.path.join(_comfy.output_dir(), "dsd_distill", f"pairs-{key}")
        if os.path.isfile(os.path.join(out, "metadata.jsonl")):
            return (out,)
        _comfy.make_room(dsd_model.spec.device)
        pipe = dsd_model.get()
        write_teacher_pairs(pipe, refs, [lines[k % len(lines)] for k in range(len(refs))], out, panel_size, steps,
                            seed=seed, progress=_bar(len(refs)))
        return (out,)


class DSDBuildStudent:
    DESCRIPTION = ("Builds a smaller DSD student from the teacher's blocks (half or a quarter of them, or your own "
                   "lists), copying the kept blocks, c_embedder and the fused LoRA. Saved to models/dsd/<name>: the "
                   "DSD Model Loader loads it like any DSD model. Distil it next to recover the quality.")
    CATEGORY = "DSD/distillation"
    FUNCTION = "build"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("student", "info")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL", {"tooltip": "The teacher."}),
            "preset": (PRESETS, {"default": "quarter", "tooltip": "half: ~1/2 of the blocks (10+19 at full size); "
                                                                  "quarter: ~1/4 (5+10, Flux-Mini's layout)."}),
            "double_blocks": ("STRING", {"default": "", "tooltip": "Optional kept double-stream blocks, e.g. "
                                                                   "'0-4,9' (overrides the preset)."}),
            "single_blocks": ("STRING", {"default": "", "tooltip": "Optional kept single-stream blocks, e.g. "
                                                                   "'0-9' (overrides the preset)."}),
            "student_name": ("STRING", {"default": "dsd_student", "tooltip": "Folder under models/dsd (replaced)."}),
        }}

    def build(self, dsd_model, preset, double_blocks, single_blocks, student_name):
        from dsd_core.distill.api import prune

        model, _ = _model_paths(dsd_model)
        folder = os.path.join(_dsd_root(), _name(student_name))
        transformer = os.path.join(folder, "transformer")
        if os.path.isdir(transformer):
            import shutil

            shutil.rmtree(transformer)
        _, dtype = _device_dtype(dsd_model)
        info = prune(model, transformer, preset=preset, double=double_blocks, single=single_blocks,
                     dtype=dtype or None)
        text = (f"{len(info['kept_double'])} double blocks {info['kept_double']}, {len(info['kept_single'])} single "
                f"blocks {info['kept_single']}; {info['params']:,} parameters ({info['param_ratio']:.1%} of the "
                "teacher)")
        return (folder, text)


class DSDDistillStudent:
    DESCRIPTION = ("Distils the teacher into the student on a paired dataset: flow matching plus output and "
                   "feature distillation (the training engine, with checkpoints in the output folder; Cancel saves "
                   "one and the next run continues). The distilled model is written to models/dsd/<output_name>.")
    CATEGORY = "DSD/distillation"
    FUNCTION = "distill"
    RETURN_TYPES = ("DSD_MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("dsd_model", "model_folder", "loss_curve")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL", {"tooltip": "The teacher."}),
            "student": ("STRING", {"forceInput": True, "tooltip": "The student folder (DSD Build Student)."}),
            "dataset": ("STRING", {"forceInput": True, "tooltip": "A paired dataset folder (metadata.jsonl)."}),
            "steps": ("INT", {"default": 500, "min": 1, "max": 1000000}),
            "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6,
                                        "tooltip": "BK-SDM / on-device personalisation project: 1e-5."}),
            "lambda_out": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05}),
            "lambda_feat": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            "panel_size": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 16}),
            "output_name": ("STRING", {"default": "dsd_student_distilled"}),
        }}

    def distill(self, dsd_model, student, dataset, steps, learning_rate, lambda_out, lambda_feat, batch_size,
                panel_size, output_name):
        from dsd_core.distill.api import distill
        from dsd_core.training.plot import loss_plot
        from dsd_core.distill.method import DistillOptions
        from dsd_core.errors import DSDError
        from dsd_core.image import pil_to_tensor
        from dsd_core.model_store import LazyPipeline, PipelineSpec
        from dsd_core.sources import FolderSource
        from dsd_core.training import TrainConfig

        model, base = _model_paths(dsd_model)
        device, dtype = _device_dtype(dsd_model)
        out = os.path.join(_dsd_root(), _name(output_name))
        cfg = TrainConfig(data=dataset, base=base, model=model, output=out, max_steps=steps, lr=learning_rate,
                          batch_size=batch_size, panel_size=panel_size, min_image_size=min(256, panel_size),
                          cpu=str(device).startswith("cpu"), dtype=dtype or "auto", local_files_only=True,
                          resume="latest", validate_every=0, checkpoint_every=max(1, min(250, steps)))
        options = DistillOptions(student=os.path.join(student, "transformer"), lambda_out=lambda_out,
                                 lambda_feat=lambda_feat)
        bar = _comfy.progress_bar(steps)
        losses: list = []

        def on_step(p):
            losses.append((p.step, p.loss))
            if bar is not None:
                bar.update_absolute(p.step, p.total_steps, ("JPEG", loss_plot(losses, 512, 256), 512))

        _comfy.make_room(device)
        result, _ = distill(cfg, options, callback=on_step, should_stop=_should_stop, progress_bar=False)
        if result.interrupted:
            _comfy.check_interrupt()
            raise DSDError(f"distillation stopped at step {result.step}; run again to continue from the checkpoint.")
        handle = LazyPipeline(PipelineSpec(source=FolderSource(base=base, model=out, local_files_only=True),
                                           dtype=dsd_model.spec.dtype, device=dsd_model.spec.device,
                                           memory=dsd_model.spec.memory, speed=dsd_model.spec.speed))
        return (handle, out, pil_to_tensor(loss_plot(result.losses)))


def _should_stop() -> bool:
    _comfy.check_interrupt()  # raises on Cancel: the engine saves a checkpoint and stops
    return False


class DSDCompareStudent:
    DESCRIPTION = ("Compares a student with its teacher on held-out pairs: an image grid (reference | teacher | "
                   "student per row, same seeds) and a report: parameters, file size, measured step-time ratio, "
                   "output agreement, PSNR, and estimated full-size memory.")
    CATEGORY = "DSD/distillation"
    FUNCTION = "compare"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "report")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dsd_model": ("DSD_MODEL", {"tooltip": "The teacher."}),
            "student": ("STRING", {"forceInput": True, "tooltip": "The student model folder (models/dsd/<name>)."}),
            "dataset": ("STRING", {"forceInput": True, "tooltip": "Held-out pairs (metadata.jsonl folder)."}),
            "pairs": ("INT", {"default": 2, "min": 1, "max": 64}),
            "steps": ("INT", {"default": 28, "min": 1, "max": 200}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            "panel_size": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 16}),
        }}

    def compare(self, dsd_model, student, dataset, pairs, steps, seed, panel_size):
        from dsd_core.distill.api import evaluate
        from dsd_core.image import pil_to_tensor

        model, base = _model_paths(dsd_model)
        device, dtype = _device_dtype(dsd_model)
        _comfy.check_interrupt()
        _comfy.make_room(device)
        report, grid = evaluate(model, os.path.join(student, "transformer"), base, dataset, panel_size, steps, pairs,
                                seed, repeats=2, device=device, dtype=dtype, local_files_only=True)
        return (pil_to_tensor(grid), json.dumps(report, indent=2, sort_keys=True))


NODE_CLASS_MAPPINGS = {"DSDTeacherPairs": DSDTeacherPairs, "DSDBuildStudent": DSDBuildStudent,
                       "DSDDistillStudent": DSDDistillStudent, "DSDCompareStudent": DSDCompareStudent}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDTeacherPairs": "DSD Teacher Pairs", "DSDBuildStudent": "DSD Build Student",
                              "DSDDistillStudent": "DSD Distill Student", "DSDCompareStudent": "DSD Compare Student"}
