"""Settings of a data-generation run (:class:`DatagenConfig`) and the grid layouts.

One place for every option and default: the CLI flags, the YAML config file and the ComfyUI nodes read them from
here. A YAML file holds any of the field names below (see ``dsd_core/datagen/example_config.yaml``); command-line
flags override it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from ..errors import InputError
from ..loading import DEFAULT_BASE
from ..memory.config import PRESETS
from ..training.config import check_choices, read_yaml


@dataclass(frozen=True)
class Layout:
    """A grid of ``rows x cols`` equal panels."""

    name: str
    rows: int
    cols: int

    @property
    def panels(self) -> int:
        return self.rows * self.cols

    def size(self, panel_size: int) -> tuple[int, int]:
        """(width, height) of the grid image for square panels of ``panel_size`` pixels."""
        return self.cols * panel_size, self.rows * panel_size


#: 1x2: two panels side by side (the DSD canvas itself); 2x2: four panels (the paper's grids).
LAYOUTS = {"1x2": Layout("1x2", 1, 2), "2x2": Layout("2x2", 2, 2)}
PROMPTERS = ("template", "gemini", "local")
CURATORS = ("gemini", "local", "none")
CAPTIONERS = ("auto", "gemini", "local", "prompt")
ON_MALFORMED = ("reject", "keep")


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise InputError(f"unknown layout {name!r}; use one of {', '.join(LAYOUTS)}.")
    return LAYOUTS[name]


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, **({"choices": tuple(choices)} if choices else {})})


@dataclass(frozen=True)
class DatagenConfig:
    """Everything a run needs. Fields marked in :data:`OUTPUT_FIELDS` decide the output: a resumed run must keep
    them (it is checked), the others (device, memory, retries, ...) may change between runs."""

    captions: str = _f("", "text file of seed captions, one a line (blank lines and # comments skipped)")
    out: str = _f("", "output folder: the dataset (metadata.jsonl + images), grids, manifest, summary")
    base: str = _f(DEFAULT_BASE, "FLUX.1-dev diffusers folder or HF repo id (its own transformer is used)")
    layout: str = _f("1x2", "grid layout: 1x2 (two panels, the DSD canvas) or 2x2 (four panels, as in the paper)",
                     choices=tuple(LAYOUTS))
    num: int = _f(0, "number of grids (0: one per seed caption; more than the captions cycles through them with "
                      "new scenes)")
    seed: int = _f(0, "base seed: grid k is drawn with seed + k; the template prompts are seeded with it too")
    # grid prompts
    prompter: str = _f("template", "who writes the grid prompts: template (built-in, offline), gemini or local "
                                   "(a local model folder, --local-vlm)", choices=PROMPTERS)
    # grid generation
    steps: int = _f(28, "denoising steps per grid")
    guidance: float = _f(3.5, "FLUX distilled guidance")
    panel_size: int = _f(512, "side of one square panel in pixels (the grid is cols x rows panels)")
    batch_size: int = _f(1, "grids per FLUX call (batches are fixed groups of consecutive grids, so a resumed or "
                            "re-sharded run draws exactly the same images)")
    max_sequence_length: int = _f(512, "T5 prompt tokens")
    dtype: str = _f("", "bfloat16 / float16 / float32 (empty: bf16 on a GPU, fp32 on CPU)",
                    choices=("", "bfloat16", "float16", "float32"))
    device: str = _f("", "cuda / cuda:N / mps / cpu (empty: the best available; under accelerate, this process's "
                         "device)")
    memory: str = _f("", "memory preset for FLUX (see `python -m dsd_core memory`; empty: full)",
                     choices=("",) + tuple(PRESETS))
    offline: bool = _f(False, "never download models")
    # curation
    curator: str = _f("gemini", "who judges the pairs: gemini, local (a local VLM folder) or none (keep all)",
                      choices=CURATORS)
    gemini_model: str = _f("", "Gemini model (default: DSD_GEMINI_MODEL or the prompt enhancer's default)")
    local_vlm: str = _f("", "folder of a local vision-language model (prompter/curator/captioner local)")
    min_confidence: float = _f(0.5, "keep a SAME verdict only with a confidence at least this (0..1)")
    curation_instructions: str = _f("", "replace the curation instructions (text or a path to a text "
                                                 "file); keep the answer format of the default")
    malformed_retries: int = _f(1, "ask again this many times when a curation reply cannot be parsed")
    on_malformed: str = _f("reject", "what to do with a pair whose reply stays unparseable: reject or keep",
                           choices=ON_MALFORMED)
    timeout: float = _f(60.0, "seconds per Gemini request")
    retries: int = _f(3, "extra Gemini attempts after timeouts, 429 and 5xx")
    # captions
    captioner: str = _f("auto", "target captions: auto (the curator's model; the grid prompt's panel text when "
                                "the curator is none), gemini, local or prompt", choices=CAPTIONERS)
    instruction_captions: bool = _f(False, "also write an instruction-style caption ('instruction' key)")
    # output
    contact_sheet_pairs: int = _f(64, "pairs shown on contact_sheet.png")

    def __post_init__(self):
        check_choices(self)
        if self.num < 0:
            raise InputError(f"num must be 0 (one grid per caption) or more, got {self.num}.")
        if self.panel_size < 16 or self.panel_size % 16:
            raise InputError(f"panel_size must be a positive multiple of 16 (FLUX), got {self.panel_size}.")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise InputError(f"min_confidence must be between 0 and 1, got {self.min_confidence}.")

    @property
    def grid_layout(self) -> Layout:
        return get_layout(self.layout)

    @property
    def caption_backend(self) -> str:
        """The captioner actually used (``auto`` resolved)."""
        if self.captioner != "auto":
            return self.captioner
        return "prompt" if self.curator == "none" else self.curator

    def instructions_text(self) -> str | None:
        """The custom curation instructions (read from the file when the value is a path)."""
        text = self.curation_instructions
        if text and os.path.isfile(os.path.expanduser(text)):
            with open(os.path.expanduser(text), encoding="utf-8") as f:
                text = f.read()
        return text.strip() if text else None

    def fingerprint(self) -> dict:
        """The settings that decide the output (compared when a run resumes)."""
        d = {k: getattr(self, k) for k in OUTPUT_FIELDS}
        d["curation_instructions"] = hashlib.sha256((self.instructions_text() or "").encode()).hexdigest()[:16]
        if self.captions and os.path.isfile(os.path.expanduser(self.captions)):
            with open(os.path.expanduser(self.captions), "rb") as f:
                d["captions_sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
        return d

    @classmethod
    def from_sources(cls, config_file: str | None = None, **overrides) -> "DatagenConfig":
        """Defaults <- the YAML ``config_file`` <- ``overrides`` whose value is not None."""
        values: dict = {}
        if config_file:
            values.update(read_yaml(config_file))
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown datagen setting(s) {', '.join(unknown)}"
                             f"{' in ' + config_file if config_file else ''}; known: {', '.join(sorted(names))}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Fields whose change would make a resumed run mix two different datasets.
OUTPUT_FIELDS = ("layout", "num", "seed", "prompter", "steps", "guidance", "panel_size", "batch_size",
                 "max_sequence_length", "curator", "min_confidence", "on_malformed", "captioner",
                 "instruction_captions")


def config_help() -> dict[str, str]:
    """Field name -> help text (CLI help and node tooltips)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DatagenConfig)}


def dumps(obj) -> str:
    """Stable one-line JSON (sorted keys) for manifests and metadata."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)
