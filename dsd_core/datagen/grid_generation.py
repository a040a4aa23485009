"""Grid generation: plain FLUX.1-dev draws each grid prompt at its layout's resolution.

The pipeline is :func:`dsd_core.loading.load_flux_pipeline` (the base's own transformer, the same memory presets as
DSD). Every grid has its own seed (a CPU ``torch.Generator``, so the same seed draws the same latents on any
device), and batches are fixed groups of consecutive grids (:func:`batches`): a resumed, re-sharded or single run
therefore calls FLUX with exactly the same batches and gets the same images.
"""

from __future__ import annotations

import logging

import torch

from .config import DatagenConfig
from .grid_prompts import GridPrompt

logger = logging.getLogger(__name__)


def batches(count: int, batch_size: int) -> list[list[int]]:
    """Item indices 0..count-1 in fixed consecutive groups of ``batch_size``."""
    return [list(range(s, min(s + batch_size, count))) for s in range(0, count, batch_size)]


def shard(groups: list[list[int]], process_index: int, num_processes: int) -> list[list[int]]:
    """The groups process ``process_index`` of ``num_processes`` owns: every ``num_processes``-th, starting at its
    index. Each group belongs to exactly one process (no overlap, no gap)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} outside 0..{num_processes - 1}")
    return groups[process_index::num_processes]


def load_grid_pipeline(cfg: DatagenConfig):
    """Plain FLUX for ``cfg`` (base, dtype, device, memory preset)."""
    from ..loading import load_flux_pipeline
    from ..memory.config import MemoryConfig

    return load_flux_pipeline(cfg.base, dtype=cfg.dtype or None, device=cfg.device or None,
                              memory=MemoryConfig.from_name(cfg.memory or "full"), local_files_only=cfg.offline)


def draw_grids(pipe, prompts: list[GridPrompt], cfg: DatagenConfig, step_callback=None) -> list:
    """One FLUX call for ``prompts`` (one batch); returns their grid images (PIL) in order.

    ``step_callback(step, total)`` is called after each denoising step and may raise to stop (ComfyUI's cancel).
    """
    width, height = cfg.grid_layout.size(cfg.panel_size)
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in prompts]

    def on_step(_pipe, step, _t, kwargs):
        if step_callback is not None:
            step_callback(step + 1, cfg.steps)
        return {}

    out = pipe(prompt=[p.prompt for p in prompts], height=height, width=width, num_inference_steps=cfg.steps,
               guidance_scale=cfg.guidance, generator=generators, max_sequence_length=cfg.max_sequence_length,
               output_type="pil", callback_on_step_end=on_step)
    return list(out.images)
