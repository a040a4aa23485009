"""Paired training data: reading, validating and turning pairs into panel tensors.

Two sources, one record type (:class:`PairRecord`):

* **a folder with ``metadata.jsonl``**, one JSON object per line::

      {"reference": "refs/cat.png", "target": "targets/cat_hat.png", "caption": "this cat wearing a hat"}

  Paths are relative to the folder. Any other keys (an instruction caption, a source id) are kept in
  :attr:`PairRecord.extra`. The key names can be changed with the column options.
* **a local Hugging Face dataset**: a ``.parquet`` / ``.arrow`` file, or a folder of them (e.g. a downloaded
  ``primecai/dsd_data`` snapshot), read with pyarrow; ``reference_column`` / ``target_column`` / ``caption_column``
  map its columns. Image cells may be ``{"bytes": ..., "path": ...}`` structs (the ``datasets`` Image feature), raw
  bytes, or paths relative to the file.

:func:`validate_pairs` checks every item before step 1 -- unreadable or missing images, missing captions, duplicate
pairs, images smaller than the minimum size -- and raises one :class:`~dsd_core.errors.InputError` naming each bad
item (its line or row) and what to fix.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass, field

import PIL.Image

from ..errors import InputError

METADATA = "metadata.jsonl"
#: At most this many problems are listed in one error (the total count is always given).
MAX_REPORTED = 20


@dataclass
class PairRecord:
    """One training pair. ``reference`` / ``target``: a file path, encoded image bytes, or a lazily read cell of a
    dataset file (:class:`ArrowCell`)."""

    name: str  # where it came from, for messages: "metadata.jsonl line 3" or "train-0000.parquet row 7"
    reference: str | bytes | ArrowCell
    target: str | bytes | ArrowCell
    caption: str
    extra: dict = field(default_factory=dict)

    def open(self, which: str) -> PIL.Image.Image:
        src = _resolve(self.reference if which == "reference" else self.target)
        image = PIL.Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        image.load()
        return image

    def content_key(self) -> str:
        """A hash of the pair's image bytes and caption (the cache key of its latents)."""
        h = hashlib.sha256()
        for src in (_resolve(self.reference), _resolve(self.target)):
            if isinstance(src, bytes):
                h.update(src)
            else:
                with open(src, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            h.update(b"\0")
        h.update(self.caption.encode("utf-8"))
        return h.hexdigest()


def load_pairs(source: str, reference_column: str = "reference", target_column: str = "target",
               caption_column: str = "caption") -> list[PairRecord]:
    """All pairs of a dataset folder (``metadata.jsonl``) or local Hugging Face dataset files."""
    source = os.path.expanduser(os.fspath(source))
    if not source:
        raise InputError("no dataset given; pass --data DIR (a folder with metadata.jsonl or parquet/arrow files).")
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, METADATA)):
        return _from_jsonl(source, reference_column, target_column, caption_column)
    files = _dataset_files(source)
    if files:
        return _from_arrow(files, reference_column, target_column, caption_column)
    if not os.path.exists(source):
        raise InputError(f"dataset {source} does not exist.")
    raise InputError(f"{source} is not a paired dataset: expected a folder with {METADATA} (one "
                     '{"reference", "target", "caption"} object per line) or .parquet/.arrow files.')


def _from_jsonl(folder: str, ref_key: str, tgt_key: str, cap_key: str) -> list[PairRecord]:
    records, problems = [], []
    with open(os.path.join(folder, METADATA), encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            name = f"{METADATA} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{name}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{name}: expected a JSON object, got {type(row).__name__}")
                continue
            missing = [k for k in (ref_key, tgt_key) if not row.get(k)]
            if missing:
                problems.append(f"{name}: missing {' and '.join(repr(k) for k in missing)}")
                continue
            extra = {k: v for k, v in row.items() if k not in (ref_key, tgt_key, cap_key)}
            records.append(PairRecord(name=f"{name} ({row[tgt_key]})",
                                      reference=os.path.join(folder, str(row[ref_key])),
                                      target=os.path.join(folder, str(row[tgt_key])),
                                      caption=_caption(row.get(cap_key)), extra=extra))
    if problems:
        raise _report(problems, os.path.join(folder, METADATA))
    if not records:
        raise InputError(f"{os.path.join(folder, METADATA)} holds no pairs; add one JSON line per pair.")
    return records


def _caption(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _dataset_files(source: str) -> list[str]:
    exts = (".parquet", ".arrow")
    if os.path.isfile(source) and source.endswith(exts):
        return [source]
    if os.path.isdir(source):
        found = [p for ext in exts for p in glob.glob(os.path.join(source, "**", f"*{ext}"), recursive=True)]
        return sorted(p for p in found if os.sep + "." not in os.path.relpath(p, source))
    return []


def _from_arrow(files: list[str], ref_col: str, tgt_col: str, cap_col: str) -> list[PairRecord]:
    """Records of parquet/arrow files. Captions and other plain columns are read at once; image cells holding bytes
    are read when needed (:class:`ArrowCell`), one file's column at a time, so a 500k-pair dataset is never in
    memory whole."""
    if importlib.util.find_spec("pyarrow") is None:
        raise InputError("reading Hugging Face dataset files needs pyarrow: `pip install pyarrow` (or "
                         "`pip install comfyui-selfdistill[train]`).")
    records = []
    for path in files:
        schema = _schema(path)
        missing = [c for c in (ref_col, tgt_col) if c not in schema.names]
        if missing:
            raise InputError(f"{path} has no column {', '.join(map(repr, missing))} (columns: "
                             f"{', '.join(schema.names)}); map them with --reference-column / "
                             "--target-column / --caption-column.")
        plain = tuple(f.name for f in schema if _is_plain_type(f.type))  # captions, ids, image paths
        rows = _read_columns(path, plain).to_pylist() if plain else [{}] * _num_rows(path)
        base = os.path.dirname(path)
        for i, row in enumerate(rows):

            def cell(col, row=row, i=i):
                return _image_cell(row[col], base) if col in row else ArrowCell(path, i, col)

            extra = {k: v for k, v in row.items() if k not in (ref_col, tgt_col, cap_col)}
            records.append(PairRecord(name=f"{os.path.basename(path)} row {i}", reference=cell(ref_col),
                                      target=cell(tgt_col), caption=_caption(row.get(cap_col)), extra=extra))
    if not records:
        raise InputError(f"{', '.join(files)} hold no rows.")
    return records


class ArrowCell:
    """An image cell of a parquet/arrow file, read when needed: a ``{"bytes", "path"}`` struct or raw bytes."""

    def __init__(self, path: str, row: int, column: str):
        self.path, self.row, self.column = path, row, column

    def read(self) -> str | bytes:
        value = _read_columns(self.path, (self.column,)).column(0)[self.row].as_py()
        return _image_cell(value, os.path.dirname(self.path))

    def __repr__(self) -> str:
        return f"ArrowCell({os.path.basename(self.path)!r}, row={self.row}, column={self.column!r})"


def _is_plain_type(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t))


def _schema(path: str):
    import pyarrow.parquet as pq

    return pq.read_schema(path) if path.endswith(".parquet") else _read_arrow(path).schema


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.endswith(".parquet") else _read_arrow(path).num_rows


def _read_arrow(path: str):
    """An Arrow IPC file (stream or file format, as ``datasets`` writes), memory-mapped: nothing is copied."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


@functools.lru_cache(maxsize=4)
def _read_columns(path: str, columns: tuple):
    """Some columns of one file. The last few are kept: items are encoded in file order, and the reference and
    target columns alternate."""
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path, columns=list(columns))
    return _read_arrow(path).select(list(columns))


def _image_cell(cell, base: str) -> str | bytes:
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        cell = cell.get("path") or ""
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    return os.path.join(base, str(cell)) if cell else ""


def _resolve(src):
    return src.read() if isinstance(src, ArrowCell) else src


# ---------------------------------------------------------------------------------------------- validation
def validate_pairs(records: list[PairRecord], min_size: int = 256, require_caption: bool = True,
                   source: str = "the dataset") -> None:
    """Open every image and check every caption; one error listing each bad item, before any training."""
    problems = []
    seen: dict[tuple, str] = {}
    for r in records:
        for which in ("reference", "target"):
            src = _resolve(getattr(r, which))
            if not src:
                problems.append(f"{r.name}: no {which} image")
                continue
            if isinstance(src, str) and not os.path.isfile(src):
                problems.append(f"{r.name}: {which} {src} does not exist")
                continue
            try:
                with (PIL.Image.open(io.BytesIO(src)) if isinstance(src, bytes) else PIL.Image.open(src)) as im:
                    im.verify()
                size = r.open(which).size
            except Exception as e:  # PIL raises many types for broken files
                problems.append(f"{r.name}: {which} is not a readable image ({type(e).__name__}: {e})")
                continue
            if min(size) < min_size:
                problems.append(f"{r.name}: {which} is {size[0]}x{size[1]}, smaller than {min_size} px on its "
                                f"shorter side (lower --min-image-size, or drop it)")
        if require_caption and not r.caption.strip():
            problems.append(f"{r.name}: empty caption (add one; caption dropout already trains the empty prompt)")
        key = (_identity(_resolve(r.reference)), _identity(_resolve(r.target)), r.caption.strip())
        if key in seen:
            problems.append(f"{r.name}: duplicate of {seen[key]} (same reference, target and caption)")
        else:
            seen[key] = r.name
    if problems:
        raise _report(problems, source)


def _identity(src) -> str:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest()
    return os.path.realpath(src) if src else ""


def _report(problems: list[str], source: str) -> InputError:
    shown = problems[:MAX_REPORTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return InputError(f"{len(problems)} problem(s) in {source}; fix them before training:\n  "
                      + "\n  ".join(shown) + more)
