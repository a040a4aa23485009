"""The dataset and its report, assembled from the manifest once every grid is done.

* ``metadata.jsonl``: the trainer's paired-dataset format, one kept pair a line, in grid order then pair order:
  ``{"reference": "panels/000003_0.png", "target": "panels/000003_1.png", "caption": "...", ...}`` with paths
  relative to the folder and extra keys ``instruction`` (with ``instruction_captions``), ``subject``,
  ``source_caption``, ``grid_id``, ``confidence``, ``caption_source``;
* ``audit.jsonl``: every rejected pair with its ``reason`` and the curator's verdict (subject, descriptions,
  reasoning, raw reply);
* ``summary.json``: grids planned / done / pending, panels, candidate pairs, kept, rejected by reason;
* ``contact_sheet.png``: kept pairs (green frame) then rejected ones (red frame, with the reason), for a quick look.

Everything is rebuilt from the manifest, so an interrupted-and-resumed run writes the same files as an uninterrupted
one.
"""

from __future__ import annotations

import json
from collections import Counter

import PIL.Image
import PIL.ImageDraw

from .curation import REASONS
from .manifest import Manifest, atomic_save_image, atomic_write_text, stage_reached


def collect(manifest: Manifest, ids: list[str]) -> tuple[list[dict], list[dict], dict]:
    """(dataset lines, audit lines, summary) from the records of ``ids``."""
    lines, audit = [], []
    reasons: Counter = Counter()
    done = pending = panels = candidates = generated = 0
    for item_id in ids:
        record = manifest.load(item_id)
        if stage_reached(record, "grid"):
            generated += 1
        if not stage_reached(record, "captioned"):
            pending += 1
            continue
        done += 1
        panels += len(record["panels"])
        prompt = record["prompt"]
        for pair in record["pairs"]:
            candidates += 1
            ref, tgt = pair["reference"], pair["target"]
            common = {"reference": record["panels"][ref], "target": record["panels"][tgt], "grid_id": item_id,
                      "subject": prompt["subject"], "source_caption": prompt["source_caption"]}
            if pair["reason"] is None:
                caption = record["captions"][str(tgt)]
                line = dict(common, caption=caption["caption"], caption_source=caption["source"],
                            confidence=pair["verdict"].get("confidence"))
                if "instruction" in pair:
                    line["instruction"] = pair["instruction"]
                lines.append(line)
            else:
                reasons[pair["reason"]] += 1
                audit.append(dict(common, reason=pair["reason"], verdict=pair["verdict"]))
    summary = {
        "grids_planned": len(ids), "grids_generated": generated, "grids_done": done, "grids_pending": pending,
        "panels": panels, "candidate_pairs": candidates, "kept": len(lines), "rejected": sum(reasons.values()),
        "rejected_by_reason": {r: reasons.get(r, 0) for r in REASONS},
    }
    return lines, audit, summary


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def contact_sheet(manifest: Manifest, kept: list[dict], rejected: list[dict], max_pairs: int = 64,
                  thumb: int = 96) -> PIL.Image.Image:
    """Pairs as reference|target thumbnails, 4 pairs a row: kept (green frame) first, then rejected (red frame)."""
    shown = [(r, True) for r in kept[:max_pairs]]
    shown += [(r, False) for r in rejected[:max(0, max_pairs - len(shown))]]
    per_row, pad, label = 4, 6, 14
    cell_w, cell_h = 2 * thumb + 2 * pad, thumb + 2 * pad + label
    rows = max(1, -(-len(shown) // per_row))
    sheet = PIL.Image.new("RGB", (per_row * cell_w, rows * cell_h), (32, 32, 32))
    draw = PIL.ImageDraw.Draw(sheet)
    if not shown:
        draw.text((pad, pad), "no pairs", fill=(255, 255, 255))
    for k, (row, keep) in enumerate(shown):
        x, y = (k % per_row) * cell_w, (k // per_row) * cell_h
        color = (40, 200, 80) if keep else (220, 50, 50)
        draw.rectangle([x + 2, y + 2, x + cell_w - 3, y + thumb + 2 * pad - 3], outline=color, width=3)
        for side, key in enumerate(("reference", "target")):
            with PIL.Image.open(manifest.abs(row[key])) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb)), (x + pad + side * thumb, y + pad))
        text = f"{row['grid_id']} " + ("kept" if keep else row["reason"])
        draw.text((x + pad, y + thumb + 2 * pad - 2), text[:40], fill=color)
    return sheet


def write_outputs(manifest: Manifest, ids: list[str], contact_sheet_pairs: int = 64) -> dict:
    """Write metadata.jsonl, audit.jsonl, summary.json and contact_sheet.png; return the summary."""
    lines, audit, summary = collect(manifest, ids)
    write_jsonl(manifest.abs("metadata.jsonl"), lines)
    write_jsonl(manifest.abs("audit.jsonl"), audit)
    atomic_write_text(manifest.abs("summary.json"), json.dumps(summary, indent=1, sort_keys=True) + "\n")
    atomic_save_image(contact_sheet(manifest, lines, audit, contact_sheet_pairs), manifest.abs("contact_sheet.png"))
    return summary


def format_summary(summary: dict) -> str:
    by_reason = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items() if v) or "none"
    text = (f"grids: {summary['grids_done']} done of {summary['grids_planned']}; panels {summary['panels']}; pairs: "
            f"{summary['candidate_pairs']} candidates, {summary['kept']} kept, {summary['rejected']} rejected "
            f"({by_reason})")
    if summary["grids_pending"]:
        text += f"; {summary['grids_pending']} grids pending (run the same command again to finish them)"
    return text
