"""The distillation steps as functions, shared by the CLI (``python -m dsd_core distill ...``) and the ComfyUI nodes.

* :func:`prune` -- build a student from a DSD model folder (preset, custom lists, or measured block importance on
  calibration pairs) and save it;
* :func:`distill` -- run the training engine with :class:`~.method.DistillationMethod`;
* :func:`evaluate` -- size, estimated full-size memory, measured speed ratio, agreement and PSNR against the teacher,
  and an image grid (reference | teacher | student per row).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import InputError
from .layout import StudentLayout

logger = logging.getLogger(__name__)


def _teacher_method(model: str, base: str, data: str = "", panel_size: int = 512, device=None, dtype=None,
                    local_files_only: bool = False, max_sequence_length: int = 512, memory: str = "full"):
    """A :class:`DistillationMethod` with only the teacher loaded (pipeline, fused LoRA, empty prompt)."""
    from ..loading import default_device, resolve_dtype
    from ..training.config import TrainConfig
    from .method import DistillationMethod, DistillOptions

    device = device or default_device()
    cfg = TrainConfig(data=data, base=base, model=model, panel_size=panel_size, local_files_only=local_files_only,
                      memory=memory)
    m = DistillationMethod(cfg, DistillOptions(max_sequence_length=max_sequence_length))
    m.load_teacher(torch.device(device), resolve_dtype(dtype, str(device)))
    return m


def _records(data: str, count: int | None = None):
    from ..training.data import load_pairs, validate_pairs

    records = load_pairs(data)
    validate_pairs(records, min_size=16, source=data)
    return records[:count] if count else records


def prune(model: str, out: str, base: str = "", preset: str = "half", double: str = "", single: str = "",
          selection: str = "uniform", data: str = "", panel_size: int = 512, calibration_pairs: int = 4,
          single_file: str = "", dtype=None, device=None, local_files_only: bool = False,
          max_sequence_length: int = 512, progress=None) -> dict:
    """Build a student of the DSD model folder ``model`` and save it to ``out`` (a transformer folder).

    ``selection="importance"`` measures block importance on the first ``calibration_pairs`` of ``data`` (needs
    ``base`` for the VAE and text encoders). Returns the saved student record.
    """
    from ..loading import resolve_dtype, resolve_model
    from .importance import block_importance
    from .student import build_student, count_params, load_teacher, save_student, student_info

    scores = None
    if selection == "importance":
        if not data or not base:
            raise InputError("block selection by importance needs calibration pairs (--data) and the FLUX base "
                             "(--base); or use --selection uniform.")
        m = _teacher_method(model, base, data, panel_size, device, dtype, local_files_only, max_sequence_length)
        teacher = m.teacher
        inputs = m.eval_inputs(_records(data, calibration_pairs), seed=0, sigmas=(0.25, 0.5, 0.75))
        scores = block_importance(teacher, inputs, progress=progress)
    else:
        transformer, lora = resolve_model(model, local_files_only=local_files_only)
        teacher = load_teacher(transformer, lora, resolve_dtype(dtype, "cpu"))
    layout = StudentLayout.for_teacher(teacher, preset, double or None, single or None, selection, scores)
    student = build_student(teacher, layout)
    info = student_info(student, layout, count_params(teacher), teacher=os.path.abspath(os.path.expanduser(model)),
                        lora_fused=True, importance=scores)
    save_student(student, out, info, single_file=single_file or None)
    return info


def distill(config, options, callback=None, should_stop=None, progress_bar: bool = True):
    """Train a student with the engine; ``config`` a :class:`TrainConfig`, ``options`` :class:`DistillOptions`."""
    from ..training import Trainer
    from .method import DistillationMethod

    method = DistillationMethod(config, options)
    # autograd on even when called from an inference-mode context (ComfyUI runs every node under inference_mode)
    with torch.inference_mode(False), torch.enable_grad():
        result = Trainer(config, method, callback=callback, should_stop=should_stop, progress_bar=progress_bar).train()
    return result, method


def full_size_equivalent(layout: StudentLayout) -> tuple[int, int]:
    """The student's kept fraction of each block kind applied to full-size FLUX (19 + 38 blocks)."""
    from .evaluate import FULL_DOUBLE, FULL_SINGLE

    return (max(1, round(FULL_DOUBLE * len(layout.double) / layout.teacher_double)),
            max(1, round(FULL_SINGLE * len(layout.single) / layout.teacher_single)))


@torch.no_grad()
def evaluate(model: str, student: str, base: str, data: str, panel_size: int = 512, steps: int = 28,
             pairs: int = 4, seed: int = 0, repeats: int = 3, device=None, dtype=None, local_files_only: bool = False,
             max_sequence_length: int = 512, memory_modes=("full", "12gb")) -> tuple[dict, object]:
    """(report, grid image) of ``student`` against the teacher ``model`` on the first ``pairs`` of ``data``."""
    import PIL.Image

    from ..image import prepare_reference
    from ..pipeline import DSDPipeline, clean_prompt
    from .evaluate import (estimated_memory, estimated_step_ratio, file_size, full_size_transformer, image_agreement,
                           output_agreement, speed_ratio)
    from .student import count_params, load_student

    m = _teacher_method(model, base, data, panel_size, device, dtype, local_files_only, max_sequence_length)
    net, info = load_student(student, dtype=m.teacher.dtype)
    if info is None:
        raise InputError(f"{student} is not a student (no student.json); make one with `distill prune` or "
                         "`distill train`.")
    layout = StudentLayout.from_dict(info)
    net = net.to(m.device).eval()
    records = _records(data, pairs)
    inputs = m.eval_inputs(records, seed=seed)
    report = {"student": os.path.abspath(student), "layout": layout.describe(), **layout.to_dict(),
              "params": count_params(net), "teacher_params": count_params(m.teacher), "file_bytes": file_size(student)}
    report["param_ratio"] = report["params"] / report["teacher_params"]
    report.update(output_agreement(net, m.teacher, layout, inputs))
    report["speed"] = speed_ratio(net, m.teacher, inputs[0], repeats=repeats)
    nd, ns = full_size_equivalent(layout)
    full = full_size_transformer(nd, ns)
    report["full_size"] = {"double": nd, "single": ns, "params": full.params, "bf16_gb": full.weight_bytes("bf16") / 1e9,
                           "step_ratio_est": estimated_step_ratio(nd, ns),
                           **{f"peak_gib_{k}": estimated_memory(nd, ns, k).peak for k in memory_modes}}
    student_pipe = DSDPipeline(**{**m.pipe.components, "transformer": net})
    student_pipe.set_progress_bar_config(disable=True)
    refs = [prepare_reference(r.open("reference"), panel_size, panel_size) for r in records]
    prompts = [clean_prompt(r.caption) for r in records]
    images = image_agreement(m.pipe, student_pipe, refs, prompts, seed=seed, height=panel_size,
                             width=2 * panel_size, num_inference_steps=steps)
    report["psnr"], report["psnr_each"] = images["psnr"], images["psnr_each"]
    grid = PIL.Image.new("RGB", (3 * panel_size, panel_size * len(records)))
    for k, (ref, (a, b)) in enumerate(zip(refs, images["images"])):
        for j, im in enumerate((ref, _to_pil(a), _to_pil(b))):
            grid.paste(im, (j * panel_size, k * panel_size))
    return report, grid


def _to_pil(t: torch.Tensor):
    from ..image import tensor_to_pil

    return tensor_to_pil(t[:1].permute(0, 2, 3, 1).cpu())[0]
