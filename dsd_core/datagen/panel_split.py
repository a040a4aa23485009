"""Panel split: cut a grid into its panels, trimming borders and gutters, and list the candidate pairs.

FLUX grids are only roughly equal: some have a frame around the whole grid, white or black gutters between panels,
or a frame per panel. The split is the equal split of the layout, corrected by what the pixels show:

1. **outer border**: uniform rows/columns at the edges (each pixel line's colour spread below ``flat_tolerance``)
   are trimmed, at most ``max_trim`` of the side;
2. **gutters**: near each nominal cut (within ``search`` of a panel's size) the run of uniform lines closest to the
   cut is removed and the cut moves to its edges; without such a run the cut stays at the nominal position;
3. **panel frames**: each panel's own uniform edges are trimmed the same way;
4. each panel is center-cropped to a square and resized to ``panel_size`` (:func:`dsd_core.image.prepare_reference`).

A line is "uniform" when the largest per-channel standard deviation of its pixels is below ``flat_tolerance``
(0-255 scale). A panel whose real content is a flat background at an edge loses at most ``max_trim`` of that side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from ..image import prepare_reference
from .config import Layout


@dataclass(frozen=True)
class SplitSettings:
    flat_tolerance: float = 6.0
    max_trim: float = 0.1
    search: float = 0.12
    trim: bool = True


def _line_spread(arr: np.ndarray, axis: int) -> np.ndarray:
    """Per line (axis=0: per column, axis=1: per row) the largest channel standard deviation along it."""
    return arr.std(axis=0 if axis == 0 else 1).max(axis=-1)


def _edge_run(flat: np.ndarray, limit: int) -> tuple[int, int]:
    """How many uniform lines lead from the start and from the end (each at most ``limit``)."""
    n = len(flat)
    lead = 0
    while lead < min(limit, n) and flat[lead]:
        lead += 1
    tail = 0
    while tail < min(limit, n - lead) and flat[n - 1 - tail]:
        tail += 1
    return lead, tail


def _trim_box(arr: np.ndarray, s: SplitSettings) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``arr`` without its uniform edges."""
    h, w = arr.shape[:2]
    cols = _line_spread(arr, 0) < s.flat_tolerance
    rows = _line_spread(arr, 1) < s.flat_tolerance
    left, right = _edge_run(cols, int(w * s.max_trim))
    top, bottom = _edge_run(rows, int(h * s.max_trim))
    return left, top, w - right, h - bottom


def _cuts(flat: np.ndarray, parts: int, s: SplitSettings) -> list[tuple[int, int]]:
    """[start, end) spans of ``parts`` panels along a line of length len(flat), cut at gutters near the nominal."""
    n = len(flat)
    size = n / parts
    window = max(1, int(size * s.search))
    bounds = [0]
    ends = []
    for k in range(1, parts):
        nominal = int(round(k * size))
        lo, hi = max(1, nominal - window), min(n - 1, nominal + window)
        best = None
        pos = lo
        while pos < hi:  # runs of uniform lines inside the window; pick the one closest to the nominal cut
            if flat[pos]:
                start = pos
                while pos < n and flat[pos]:
                    pos += 1
                dist = 0 if start <= nominal < pos else min(abs(start - nominal), abs(pos - 1 - nominal))
                if best is None or dist < best[0]:
                    best = (dist, start, pos)
            else:
                pos += 1
        if best is not None and s.trim:
            ends.append(best[1])
            bounds.append(best[2])
        else:
            ends.append(nominal)
            bounds.append(nominal)
    ends.append(n)
    return list(zip(bounds, ends))


def split_grid(grid: PIL.Image.Image, layout: Layout, panel_size: int,
               settings: SplitSettings | None = None) -> list[PIL.Image.Image]:
    """The ``layout.panels`` panels of ``grid``, row by row, each ``panel_size`` square."""
    s = settings or SplitSettings()
    arr = np.asarray(grid.convert("RGB"), dtype=np.float32)
    if s.trim:
        left, top, right, bottom = _trim_box(arr, s)
        arr = arr[top:bottom, left:right]
    col_flat = _line_spread(arr, 0) < s.flat_tolerance
    row_flat = _line_spread(arr, 1) < s.flat_tolerance
    col_spans = _cuts(col_flat, layout.cols, s)
    row_spans = _cuts(row_flat, layout.rows, s)
    panels = []
    for r0, r1 in row_spans:
        for c0, c1 in col_spans:
            panel = arr[r0:r1, c0:c1]
            if s.trim and panel.shape[0] > 2 and panel.shape[1] > 2:
                l, t, r, b = _trim_box(panel, s)
                panel = panel[t:b, l:r]
            image = PIL.Image.fromarray(panel.round().clip(0, 255).astype(np.uint8))
            panels.append(prepare_reference(image, panel_size, panel_size))
    return panels


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered pair (reference, target) of ``n`` panels: n*(n-1) candidates."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]
