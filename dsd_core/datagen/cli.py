"""``python -m dsd_core datagen``: the data-generation subcommand (``add_parser`` + ``run``).

Every :class:`~dsd_core.datagen.config.DatagenConfig` field is a flag (``--min-confidence``, ...); a YAML file given
with ``--config`` sets any of them, and flags override it. Run it again with the same settings to resume. Under
``accelerate launch`` the grids are shared between the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..training.config import add_config_arguments
from .config import DatagenConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "datagen", help="make a paired training dataset with FLUX itself (grids -> panels -> curated pairs)",
        description="Self-distillation data generation: FLUX.1-dev draws grids of one subject in different scenes, "
                    "the grids are cut into panels, a VLM keeps the pairs that really show the same subject, and "
                    "the result is written in the trainer's format (metadata.jsonl + images). Resumable: run the "
                    "same command again. Multi-GPU: accelerate launch -m dsd_core datagen ...")
    p.add_argument("--config", help="YAML file of settings (any of the flags below, with _ or -); flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p, DatagenConfig, title="settings (also YAML keys)")
    return p


def config_from_args(args) -> DatagenConfig:
    names = {f.name for f in dataclasses.fields(DatagenConfig)}
    return DatagenConfig.from_sources(args.config, **{k: v for k, v in vars(args).items() if k in names})


def _progress(quiet: bool, main: bool):
    """A Hooks.progress callback drawing one tqdm bar per stage."""
    from tqdm.auto import tqdm

    bars: dict = {}
    names = {"prompts": "grid prompts", "grid": "grids", "captioned": "pairs (split, curate, caption)"}

    def progress(stage, done, total):
        if quiet or not main:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=names.get(stage, stage), unit="grid")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def run(args) -> int:
    from .output import format_summary
    from .run import Hooks, _process_state, run_datagen

    cfg = config_from_args(args)
    state = _process_state(cfg.device)
    summary = run_datagen(cfg, hooks=Hooks(progress=_progress(args.quiet, state.is_local_main_process)),
                          state=state)
    if summary is not None:
        print(format_summary(summary))
        print(f"dataset: {cfg.out}/metadata.jsonl; audit: audit.jsonl; look: contact_sheet.png", file=sys.stdout)
    return 0
