"""Self-distillation data generation: FLUX.1-dev makes its own training pairs (project issue 12).

The chain of the paper (dsd-reference.md §5), one module a stage:

1. :mod:`.grid_prompts`: seed captions -> grid prompts (1x2 / 2x2, per-panel content, "same subject"), written by
   built-in templates, Gemini or a local model; deduplicated, each stored with its source caption;
2. :mod:`.grid_generation`: plain FLUX.1-dev (:func:`dsd_core.loading.load_flux_pipeline`, memory presets included)
   draws each grid at the layout's resolution, seeded per grid, in fixed batches;
3. :mod:`.panel_split`: grids -> panels (equal split corrected for borders and gutters); every ordered pair of
   panels is a candidate;
4. :mod:`.curation`: a VLM (Gemini or local, through :mod:`dsd_core.prompt`'s clients) judges each pair step by step;
   the structured verdict keeps or rejects it with a reason;
5. :mod:`.captions`: target captions (and optionally instructions) for kept pairs;
6. :mod:`.output`: ``metadata.jsonl`` (the trainer's paired-dataset format), ``audit.jsonl``, ``summary.json``,
   ``contact_sheet.png``.

:mod:`.manifest` makes it resumable (one atomic record per grid and stage), :mod:`.run` runs it on one or many
processes (``accelerate launch``), :mod:`.cli` is ``python -m dsd_core datagen``, :mod:`.config` holds every setting.

    from dsd_core.datagen import DatagenConfig, run_datagen
    summary = run_datagen(DatagenConfig(captions="captions.txt", out="data/pairs", base="FLUX.1-dev", num=1000))
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

#: public name -> submodule; imported on first use, so ``import dsd_core.datagen`` (and the CLI's parser) stays light
_EXPORTS = {"LAYOUTS": "config", "DatagenConfig": "config", "Layout": "config", "Curator": "curation",
            "Verdict": "curation", "parse_verdict": "curation", "GridPrompt": "grid_prompts",
            "build_prompt": "grid_prompts", "make_grid_prompts": "grid_prompts", "read_captions": "grid_prompts",
            "ordered_pairs": "panel_split", "split_grid": "panel_split", "Hooks": "run", "run_datagen": "run"}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
