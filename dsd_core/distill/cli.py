"""``python -m dsd_core distill data|prune|train|eval``: task-specific distillation from the command line.

Every option is a flag and a key of the YAML file given with ``--config FILE.yaml`` (flat ``key: value`` lines; flags
win over the file), through the training engine's option machinery (:mod:`dsd_core.training.config`).

    distill data  --model DSD --base FLUX --references refs/ --prompts prompts.txt --out pairs/
    distill prune --model DSD --preset quarter --out student/            (or --selection importance --data pairs/)
    distill train --config distill.yaml                                   (engine flags + distillation flags)
    distill eval  --model DSD --student out/transformer --base FLUX --data held_out/ --out report/
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..training.config import _f
from .layout import PRESETS, SELECTIONS


@dataclass
class DataOptions:
    """Teacher-painted pairs: references + prompts -> a paired dataset."""

    model: str = _f("", "the teacher: a DSD model folder (transformer/ + pytorch_lora_weights.safetensors)")
    base: str = _f("black-forest-labs/FLUX.1-dev", "FLUX.1-dev diffusers folder or repo id")
    references: str = _f("", "a folder of reference images, or one image file")
    prompts: str = _f("", "a text file with one prompt per line (used in turn for the references)")
    out: str = _f("", "new folder for the pairs (metadata.jsonl + PNGs)")
    panel_size: int = _f(512, "panel side in pixels (DSD: 512)")
    steps: int = _f(28, "sampling steps of the teacher")
    guidance: float = _f(3.5, "distilled guidance of the teacher")
    seed: int = _f(0, "seed of pair 0 (pair k uses seed + k)")
    dtype: str = _f("", "bfloat16 / float16 / float32 (default: bf16 on GPU, fp32 on CPU)")
    local_files_only: bool = _f(False, "never download models")


@dataclass
class PruneOptions:
    """Student construction: which teacher blocks to keep."""

    model: str = _f("", "the teacher: a DSD model folder (transformer/ + pytorch_lora_weights.safetensors)")
    out: str = _f("", "new folder for the student transformer (config.json + safetensors + student.json)")
    preset: str = _f("half", "size: " + ", ".join(f"{k} (~{v:g} of the blocks)" for k, v in PRESETS.items()),
                     tuple(PRESETS))
    double: str = _f("", "kept double-stream blocks, e.g. '0-4,9' (overrides --preset)")
    single: str = _f("", "kept single-stream blocks, e.g. '0-9,20' (overrides --preset)")
    selection: str = _f("uniform", "which blocks a preset keeps: uniform (evenly spaced) or importance (measured "
                                   "on --data)", SELECTIONS)
    data: str = _f("", "calibration pairs for --selection importance (a metadata.jsonl folder)")
    calibration_pairs: int = _f(4, "pairs of --data used for the importance scores")
    base: str = _f("", "FLUX.1-dev folder or repo id (only for --selection importance)")
    panel_size: int = _f(512, "panel side of the calibration canvases")
    single_file: str = _f("", "also write the student as one .safetensors file (ComfyUI diffusion_models)")
    dtype: str = _f("", "dtype of the saved student (default: the teacher's on the CPU: float32)")
    local_files_only: bool = _f(False, "never download models")


@dataclass
class EvalOptions:
    """Student vs teacher: size, memory, speed, agreement."""

    model: str = _f("", "the teacher: a DSD model folder")
    student: str = _f("", "the student transformer folder (from prune or train: OUTPUT/transformer)")
    base: str = _f("black-forest-labs/FLUX.1-dev", "FLUX.1-dev diffusers folder or repo id")
    data: str = _f("", "held-out pairs (metadata.jsonl folder)")
    pairs: int = _f(4, "number of held-out pairs used")
    out: str = _f("", "folder for report.json and grid.png (reference | teacher | student per row)")
    panel_size: int = _f(512, "panel side in pixels")
    steps: int = _f(28, "sampling steps for the PSNR images")
    seed: int = _f(0, "seed of the noise and the images")
    repeats: int = _f(3, "timed forwards per model for the speed ratio")
    dtype: str = _f("", "compute dtype (default: bf16 on GPU, fp32 on CPU)")
    local_files_only: bool = _f(False, "never download models")


def add_parser(subparsers) -> None:
    from ..training.config import TrainConfig, add_config_arguments
    from .options import DistillOptions

    p = subparsers.add_parser("distill", help="task-specific distillation: a smaller, faster DSD student",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="distill_command", required=True)
    for name, classes, text in (
            ("data", (DataOptions,), "make a paired dataset whose targets the teacher paints"),
            ("prune", (PruneOptions,), "build a student from the teacher's blocks"),
            ("train", (TrainConfig, DistillOptions), "distil the teacher into the student (training engine)"),
            ("eval", (EvalOptions,), "compare the student with the teacher")):
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--config", default=None, help="YAML file of options (keys = the flag names)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        add_config_arguments(q, *classes)
        q.set_defaults(distill_classes=classes)


def run(args) -> int:
    from ..training.config import config_from_args

    options = config_from_args(args, *args.distill_classes)
    return {"data": _data, "prune": _prune, "train": _train, "eval": _eval}[args.distill_command](args, *options)


def _need(opts, *names) -> None:
    from ..errors import InputError

    missing = [n for n in names if not getattr(opts, n)]
    if missing:
        raise InputError(f"missing option(s): {', '.join('--' + n.replace('_', '-') for n in missing)}.")


def _data(args, o: DataOptions) -> int:
    from ..errors import InputError
    from ..image import load_image
    from ..loading import load_pipeline
    from .data import write_teacher_pairs

    _need(o, "model", "references", "prompts", "out")
    refs = o.references
    files = sorted(os.path.join(refs, n) for n in os.listdir(refs)
                   if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))) if os.path.isdir(refs) else [refs]
    with open(o.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not files or not prompts:
        raise InputError(f"no reference images in {refs} or no prompts in {o.prompts}.")
    pairs = [(ref, prompts[k % len(prompts)]) for k, ref in enumerate(files)]
    pipe = load_pipeline(base=o.base, model=o.model, dtype=o.dtype or None, local_files_only=o.local_files_only)
    pipe.set_progress_bar_config(disable=args.quiet)
    out = write_teacher_pairs(pipe, [load_image(r) for r, _ in pairs], [p for _, p in pairs], o.out, o.panel_size,
                              o.steps, o.guidance, o.seed)
    print(f"wrote {len(pairs)} teacher-painted pairs to {out}")
    return 0


def _prune(args, o: PruneOptions) -> int:
    from .api import prune

    _need(o, "model", "out")
    info = prune(o.model, o.out, base=o.base, preset=o.preset, double=o.double, single=o.single,
                 selection=o.selection, data=o.data, panel_size=o.panel_size, calibration_pairs=o.calibration_pairs,
                 single_file=o.single_file, dtype=o.dtype or None, local_files_only=o.local_files_only)
    print(f"student: {len(info['kept_double'])}/{info['teacher_num_layers']} double blocks {info['kept_double']}, "
          f"{len(info['kept_single'])}/{info['teacher_num_single_layers']} single blocks {info['kept_single']}")
    print(f"parameters: {info['params']:,} of {info['teacher_params']:,} ({info['param_ratio']:.1%}); saved to {o.out}")
    return 0


def _train(args, config, options) -> int:
    from .api import distill

    result, _ = distill(config, options, progress_bar=not args.quiet)
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with --resume latest")
        return 130
    print(f"distilled {result.step} steps; the student is {os.path.join(result.output_dir, 'transformer')} "
          f"(generate with --model {result.output_dir})")
    return 0


def _eval(args, o: EvalOptions) -> int:
    from ..training.io import atomic_write_text
    from .api import evaluate

    _need(o, "model", "student", "data", "out")
    report, grid = evaluate(o.model, o.student, o.base, o.data, o.panel_size, o.steps, o.pairs, o.seed, o.repeats,
                            dtype=o.dtype or None, local_files_only=o.local_files_only)
    os.makedirs(o.out, exist_ok=True)
    atomic_write_text(os.path.join(o.out, "report.json"), json.dumps(report, indent=2, sort_keys=True) + "\n")
    grid.save(os.path.join(o.out, "grid.png"))
    full, speed = report["full_size"], report["speed"]
    print(f"student {report['layout']}: {report['params']:,} parameters ({report['param_ratio']:.1%} of the teacher), "
          f"{report['file_bytes'] / 1e6:.1f} MB")
    print(f"measured step time student/teacher: {speed['ratio']:.2f} ({speed['student_s'] * 1e3:.1f} / "
          f"{speed['teacher_s'] * 1e3:.1f} ms)")
    print(f"agreement: velocity rel. MSE {report['velocity_rel_mse']:.4f}, feature distance "
          f"{report['feature_distance']:.4f}, PSNR vs teacher {report['psnr']:.1f} dB")
    print(f"full-size equivalent ({full['double']}+{full['single']} blocks, estimates): {full['params'] / 1e9:.2f} B "
          f"parameters, {full['bf16_gb']:.1f} GB bf16, peak VRAM ~{full['peak_gib_full']:.1f} GiB (no offload) / "
          f"~{full['peak_gib_12gb']:.1f} GiB (12gb preset), step time ~{full['step_ratio_est']:.2f}x")
    print(f"wrote {os.path.join(o.out, 'report.json')} and grid.png")
    return 0
