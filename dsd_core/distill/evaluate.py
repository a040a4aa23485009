"""Measuring a student against its teacher.

* **size**: parameters, file size on disk, and for the full-size layout (19 + 38 blocks, 3072 wide) the parameters,
  bf16 file size and *estimated* peak VRAM from the memory model (:mod:`dsd_core.memory.estimator`) per memory preset;
* **speed**: measured time of one transformer forward (one sampling step without true guidance) of student and
  teacher on the same canvas, and their ratio; :func:`estimated_step_ratio` gives the FLOP-count ratio at full size
  (both block kinds cost 12 D^2 multiply-adds per token plus attention, so time ~ kept blocks);
* **agreement** on held-out inputs: the velocity's relative MSE and the mean feature distance over the mapped blocks
  (:func:`output_agreement`), and the PSNR of generated images against the teacher's with the same seeds
  (:func:`image_agreement`).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time

import torch

from .features import BlockRecorder
from .layout import PRESETS, StudentLayout
from .losses import feature_distance
from .student import count_params

FULL_DOUBLE, FULL_SINGLE = 19, 38


# ---------------------------------------------------------------------------------------------- size and memory
@functools.lru_cache(maxsize=16)
def full_size_transformer(num_layers: int, num_single_layers: int):
    """:class:`ComponentSize` of a full-width DSD transformer with the given block counts (meta device)."""
    from ..memory.apply import FP8_KEEP_TRANSFORMER
    from ..memory.estimator import _config, _measure
    from ..transformer import DSDTransformer2DModel

    config = dict(_config("transformer"), num_layers=num_layers, num_single_layers=num_single_layers)
    with torch.device("meta"):
        model = DSDTransformer2DModel(**config)
    return _measure("transformer", model, FP8_KEEP_TRANSFORMER)


def estimated_memory(num_layers: int, num_single_layers: int, memory: str = "full", **kwargs):
    """The memory model's :class:`MemoryEstimate` of full-size DSD with a transformer of these block counts.

    The DSD LoRA is counted as fused (a student carries it in its weights), so it adds no memory.
    """
    from ..memory.config import MemoryConfig
    from ..memory.estimator import estimate

    cfg = MemoryConfig.from_preset(memory)
    if cfg.transformer_weights in ("native", "fp8"):
        cfg = cfg.replace(fuse_lora=True)
    return estimate(cfg, transformer_size=full_size_transformer(num_layers, num_single_layers), lora_bytes=0,
                    **kwargs)


def estimated_step_ratio(num_layers: int, num_single_layers: int, tokens: int = 2048 + 512, width: int = 3072) -> float:
    """Multiply-adds of one full-size forward with these block counts over the full teacher's (19 + 38)."""
    def macs(nd: int, ns: int) -> float:
        per_block = tokens * 12 * width**2 + 2 * tokens**2 * width
        embed = tokens * width * (64 * 2 + 64) + 512 * 4096 * width  # x/c/proj_out, context_embedder
        return (nd + ns) * per_block + embed

    return macs(num_layers, num_single_layers) / macs(FULL_DOUBLE, FULL_SINGLE)


def full_size_table(presets=tuple(PRESETS), memory_modes=("full", "12gb")) -> list[dict]:
    """One row per preset (uniform selection on the full-size 19 + 38 layout): blocks, parameters, bf16 GB,
    estimated peak VRAM (and VRAM of the denoising phase, without the CUDA context) per memory mode and the
    estimated per-step ratio."""
    rows = []
    teacher = full_size_transformer(FULL_DOUBLE, FULL_SINGLE)
    for preset in presets:
        layout = StudentLayout.from_preset(preset, FULL_DOUBLE, FULL_SINGLE)
        nd, ns = len(layout.double), len(layout.single)
        size = full_size_transformer(nd, ns)
        row = {"preset": preset, "double": nd, "single": ns, "params": size.params,
               "param_ratio": size.params / teacher.params, "bf16_gb": size.weight_bytes("bf16") / 1e9,
               "step_ratio_est": estimated_step_ratio(nd, ns)}
        for mode in memory_modes:
            est = estimated_memory(nd, ns, mode)
            row[f"peak_{mode}"] = est.peak
            row[f"denoise_{mode}"] = est.phases["denoise"]
        rows.append(row)
    return rows


def file_size(path: str) -> int:
    """Bytes of a file, or of the safetensors in a folder."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------- speed
@torch.no_grad()
def step_time(model, kwargs: dict, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of one forward of ``model`` on ``kwargs``."""
    for _ in range(warmup):
        model(**kwargs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_ratio(student, teacher, kwargs: dict, repeats: int = 3) -> dict:
    """Measured per-step time of student and teacher on the same input, interleaved, and student/teacher."""
    t_student, t_teacher = [], []
    for _ in range(repeats):
        t_teacher.append(step_time(teacher, kwargs, 1, 0 if t_teacher else 1))
        t_student.append(step_time(student, kwargs, 1, 0 if t_student else 1))
    ts, tt = statistics.median(t_student), statistics.median(t_teacher)
    return {"student_s": ts, "teacher_s": tt, "ratio": ts / tt}


# ---------------------------------------------------------------------------------------------- agreement
@torch.no_grad()
def output_agreement(student, teacher, layout: StudentLayout, inputs: list[dict], feature_map: str = "segment_end",
                     massive: str = "normalize") -> dict:
    """Relative velocity MSE and mean feature distance of ``student`` vs ``teacher`` over held-out ``inputs``."""
    pairs = layout.feature_map(feature_map)
    rel, feat = [], []
    with BlockRecorder(student, [s for s, _ in pairs]) as rs, BlockRecorder(teacher, [t for _, t in pairs]) as rt:
        for kw in inputs:
            v_t = teacher(**kw)[0].float()
            v_s = student(**kw)[0].float()
            rel.append(float((v_s - v_t).pow(2).mean() / v_t.pow(2).mean().clamp_min(1e-12)))
            d = [feature_distance(h_s, h_t, massive) for s, t in pairs for h_s, h_t in zip(rs.outputs[s], rt.outputs[t])]
            feat.append(float(torch.stack(d).mean()))
    return {"velocity_rel_mse": statistics.fmean(rel), "feature_distance": statistics.fmean(feat)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two images in [0, 1]."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def image_agreement(teacher_pipe, student_pipe, references, prompts, seed: int = 0, **call) -> dict:
    """Generate with both pipelines (same seeds) and return the mean PSNR of the results, plus the images."""
    values, pairs = [], []
    for k, (ref, prompt) in enumerate(zip(references, prompts)):
        a = teacher_pipe(ref, prompt, seed=seed + k, output_type="pt", **call).images
        b = student_pipe(ref, prompt, seed=seed + k, output_type="pt", **call).images
        values.append(psnr(a, b))
        pairs.append((a, b))
    finite = [v for v in values if math.isfinite(v)]
    return {"psnr": statistics.fmean(finite) if finite else float("inf"), "psnr_each": values, "images": pairs}


def size_report(student, teacher=None, path: str | None = None) -> dict:
    out = {"params": count_params(student)}
    if teacher is not None:
        out["teacher_params"] = count_params(teacher)
        out["param_ratio"] = out["params"] / out["teacher_params"]
    if path is not None:
        out["file_bytes"] = file_size(path)
    return out

