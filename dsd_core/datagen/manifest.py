"""The run's manifest: one small JSON record per grid, saying how far it got, written atomically.

Layout of an output folder (all paths in records are relative to it)::

    run.json              the settings that decide the output (a resumed run must match them)
    prompts.jsonl         the grid prompts, one a line (written once, by the main process)
    manifest/<id>.json    per grid: its stage and results so far
    grids/<id>.png        the grid FLUX drew
    panels/<id>_<k>.png   its panels, row by row
    processes/<rank>.jsonl  per process and run: the grids it owned and the ones it drew (a work log)
    metadata.jsonl, audit.jsonl, summary.json, contact_sheet.png   the results (see :mod:`.output`)

Stages, in order: ``grid`` (drawn), ``panels`` (split), ``curated`` (every pair judged), ``captioned`` (kept pairs
captioned; the grid is done). A record is replaced as a whole (temp file + ``os.replace``) after each stage, and the
files it names are written (atomically too) before it, so a run killed at any moment leaves only complete stages:
the next run continues with the first missing stage of each grid. One file per grid means several processes never
write the same file.
"""

from __future__ import annotations

import json
import os

from ..errors import InputError
from ..training.io import atomic_write_text  # noqa: F401  (re-exported for the datagen modules)

STAGES = ("grid", "panels", "curated", "captioned")


def atomic_save_image(image, path: str) -> None:
    """Save a PIL image as PNG atomically, with the user's umask (:func:`dsd_core.files.atomic_path`)."""
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def stage_reached(record: dict | None, stage: str) -> bool:
    """Whether ``record`` has completed ``stage``."""
    return record is not None and STAGES.index(record.get("stage", STAGES[0])) >= STAGES.index(stage)


class Manifest:
    """Per-grid records under ``out/manifest``."""

    def __init__(self, out_dir: str):
        self.out = os.path.abspath(out_dir)
        self.dir = os.path.join(self.out, "manifest")

    def path(self, item_id: str) -> str:
        return os.path.join(self.dir, f"{item_id}.json")

    def load(self, item_id: str) -> dict | None:
        try:
            with open(self.path(item_id), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            raise InputError(f"manifest record {self.path(item_id)} is damaged (not JSON); delete it to redo that "
                             "grid.") from None

    def save(self, record: dict) -> None:
        if record.get("stage") not in STAGES:
            raise ValueError(f"unknown stage {record.get('stage')!r}")
        atomic_write_text(self.path(record["id"]), json.dumps(record, sort_keys=True, indent=1) + "\n")

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.out).replace(os.sep, "/")

    def abs(self, rel: str) -> str:
        return os.path.join(self.out, rel)


def check_run_settings(out_dir: str, fingerprint: dict) -> None:
    """Write ``run.json`` on the first run; on a resumed run, require the same output-deciding settings."""
    path = os.path.join(out_dir, "run.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise InputError(f"{out_dir} holds a run with other settings ({detail}); resume with the same settings "
                             "or choose a new --out folder.")
        return
    atomic_write_text(path, json.dumps(fingerprint, sort_keys=True, indent=1) + "\n")
