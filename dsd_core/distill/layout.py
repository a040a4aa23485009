"""Which teacher blocks a student keeps, and which teacher block each student block is distilled towards.

A FLUX/DSD transformer has ``num_layers`` double-stream blocks (19 at full size) followed by ``num_single_layers``
single-stream blocks (38). A :class:`StudentLayout` lists the kept teacher indices of each kind, in order.

Presets by size (``keep`` = fraction of the blocks of each kind, rounded up, at least one):

* ``full``    -- every block (the student equals the teacher; used to check the construction);
* ``half``    -- ~1/2: 10 double + 19 single blocks at full size (Flux.1-lite-like depth);
* ``quarter`` -- ~1/4: 5 double + 10 single blocks at full size (the Flux-Mini layout, 12 B -> ~3.2 B).

Which blocks a preset keeps is chosen by ``selection``:

* ``uniform``: evenly spaced, first and last block always kept (needs no data);
* ``importance``: the blocks whose removal changes the teacher's output most on calibration canvases
  (:mod:`dsd_core.distill.importance`), the first block of each kind always kept (early FLUX blocks are the critical
  ones: Flux.1-lite, HierarchicalPrune).

Feature mapping (``feature_map``): a student block ``j`` that was initialised from teacher block ``kept[j]`` stands in
for the teacher blocks up to the next kept one, so by default (``segment_end``) its output is compared with the output
of the *last* teacher block of that segment (``kept[j+1] - 1``; the last student block of a kind with the teacher's
last block of that kind) -- Flux-Mini's "student block x <-> teacher block 4x", BK-SDM's stage outputs. ``same``
compares it with the output of the teacher block it was copied from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

PRESETS = {"full": 1.0, "half": 0.5, "quarter": 0.25}
SELECTIONS = ("uniform", "importance")
FEATURE_MAPS = ("segment_end", "same")
DOUBLE = "transformer_blocks"
SINGLE = "single_transformer_blocks"


def kept_count(total: int, fraction: float) -> int:
    return max(1, min(total, math.ceil(total * fraction - 1e-9)))


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` evenly spaced indices of ``range(total)``, first and last included."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def top_indices(scores: list[float], count: int, always: tuple[int, ...] = (0,)) -> list[int]:
    """The ``count`` indices with the largest ``scores`` (``always`` included first), in ascending order."""
    chosen = [i for i in always if i < len(scores)][:count]
    for i in sorted(range(len(scores)), key=lambda k: (-scores[k], k)):
        if len(chosen) >= count:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def parse_indices(spec, total: int, what: str) -> list[int]:
    """Block indices from a list or a string like ``"0-4,9,18"``; checked against ``total`` blocks."""
    if isinstance(spec, str):
        out: list[int] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            try:
                if "-" in part:
                    a, b = (int(x) for x in part.split("-", 1))
                    out.extend(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise InputError(f"cannot read {what} block list {spec!r}; write indices and ranges like "
                                 "'0-4,9,18'.") from None
    else:
        out = [int(i) for i in spec]
    if not out:
        raise InputError(f"the {what} block list is empty; a student keeps at least one {what} block.")
    bad = [i for i in out if not 0 <= i < total]
    if bad:
        raise InputError(f"{what} block index {bad[0]} does not exist; the teacher has {total} {what} blocks "
                         f"(0-{total - 1}).")
    if len(set(out)) != len(out):
        raise InputError(f"{what} block list {out} names a block twice; list each kept block once.")
    return sorted(out)


@dataclass(frozen=True)
class StudentLayout:
    """Kept teacher block indices (ascending) of each kind, and the teacher's block counts."""

    double: tuple[int, ...]
    single: tuple[int, ...]
    teacher_double: int
    teacher_single: int
    selection: str = "custom"

    def __post_init__(self):
        parse_indices(list(self.double), self.teacher_double, "double-stream")
        parse_indices(list(self.single), self.teacher_single, "single-stream")
        if list(self.double) != sorted(self.double) or list(self.single) != sorted(self.single):
            raise InputError("kept block lists must be in ascending order (blocks keep their teacher order).")

    # -------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, preset: str, teacher_double: int, teacher_single: int, selection: str = "uniform",
                    scores: dict | None = None) -> "StudentLayout":
        """A preset by size; ``scores`` (``{"double": [...], "single": [...]}``) for ``selection="importance"``."""
        if preset not in PRESETS:
            raise InputError(f"unknown student preset {preset!r}; choose one of {', '.join(PRESETS)} or give block "
                             "lists.")
        if selection not in SELECTIONS:
            raise InputError(f"unknown block selection {selection!r}; choose one of {', '.join(SELECTIONS)}.")
        nd, ns = kept_count(teacher_double, PRESETS[preset]), kept_count(teacher_single, PRESETS[preset])
        if selection == "importance":
            if not scores:
                raise InputError("selection 'importance' needs block importance scores; measure them first "
                                 "(dsd_core.distill.importance.block_importance) or use selection 'uniform'.")
            double, single = top_indices(scores["double"], nd), top_indices(scores["single"], ns)
        else:
            double, single = uniform_indices(teacher_double, nd), uniform_indices(teacher_single, ns)
        return cls(tuple(double), tuple(single), teacher_double, teacher_single, f"{preset}/{selection}")

    @classmethod
    def from_lists(cls, double, single, teacher_double: int, teacher_single: int) -> "StudentLayout":
        return cls(tuple(parse_indices(double, teacher_double, "double-stream")),
                   tuple(parse_indices(single, teacher_single, "single-stream")), teacher_double, teacher_single)

    @classmethod
    def for_teacher(cls, teacher, preset: str | None = None, double=None, single=None, selection: str = "uniform",
                    scores: dict | None = None) -> "StudentLayout":
        """A layout for ``teacher``: explicit ``double``/``single`` lists (missing kinds kept whole) or a preset."""
        nd, ns = teacher.config.num_layers, teacher.config.num_single_layers
        if double is not None or single is not None:
            return cls.from_lists(range(nd) if double is None else double, range(ns) if single is None else single,
                                  nd, ns)
        return cls.from_preset(preset or "half", nd, ns, selection, scores)

    # -------------------------------------------------------------- use
    @property
    def keeps_all(self) -> bool:
        return len(self.double) == self.teacher_double and len(self.single) == self.teacher_single

    def feature_map(self, mode: str = "segment_end") -> list[tuple[str, str]]:
        """(student block name, teacher block name) pairs whose outputs the feature loss compares."""
        if mode not in FEATURE_MAPS:
            raise InputError(f"unknown feature map {mode!r}; choose one of {', '.join(FEATURE_MAPS)}.")
        pairs = []
        for prefix, kept, total in ((DOUBLE, self.double, self.teacher_double),
                                    (SINGLE, self.single, self.teacher_single)):
            for j, k in enumerate(kept):
                if mode == "same":
                    target = k
                else:
                    target = kept[j + 1] - 1 if j + 1 < len(kept) else total - 1
                pairs.append((f"{prefix}.{j}", f"{prefix}.{target}"))
        return pairs

    def state_key_map(self) -> dict[str, str]:
        """Teacher block prefix -> student block prefix (``transformer_blocks.9.`` -> ``transformer_blocks.4.``)."""
        out = {}
        for prefix, kept in ((DOUBLE, self.double), (SINGLE, self.single)):
            for j, k in enumerate(kept):
                out[f"{prefix}.{k}."] = f"{prefix}.{j}."
        return out

    def to_dict(self) -> dict:
        return {"kept_double": list(self.double), "kept_single": list(self.single),
                "teacher_num_layers": self.teacher_double, "teacher_num_single_layers": self.teacher_single,
                "selection": self.selection}

    @classmethod
    def from_dict(cls, d: dict) -> "StudentLayout":
        try:
            return cls(tuple(d["kept_double"]), tuple(d["kept_single"]), int(d["teacher_num_layers"]),
                       int(d["teacher_num_single_layers"]), d.get("selection", "custom"))
        except KeyError as e:
            raise InputError(f"student metadata lacks {e.args[0]!r}; it was not written by dsd_core.distill.") from None

    def describe(self) -> str:
        return (f"{len(self.double)}/{self.teacher_double} double + {len(self.single)}/{self.teacher_single} single "
                f"blocks ({self.selection})")
