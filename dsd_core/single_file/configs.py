"""The shipped full-size configs (``dsd_core/configs/*.json``) and dtype parsing."""

from __future__ import annotations

import json
import os

import torch

from ..errors import DSDError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
#: name -> file in ``dsd_core/configs``.
CONFIG_FILES = {
    "clip": "clip_l.json",
    "t5": "t5xxl_encoder.json",
    "vae": "flux_vae.json",
    "scheduler": "flux_dev_scheduler.json",
    "transformer": "dsd_transformer.json",
}
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def shipped_config(name: str) -> dict:
    """A full-size config as a dict, without the ``_comment``/``_class_name`` bookkeeping keys."""
    with open(os.path.join(CONFIG_DIR, CONFIG_FILES[name]), encoding="utf-8") as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def read_config(config) -> dict:
    """A config given as a dict, a JSON file, or a folder holding ``config.json`` (extra ``_`` keys dropped)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    path = os.path.expanduser(os.fspath(config))
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise DSDError(f"config {path} does not exist; pass a dict, a config.json file or its folder.")
    with open(path, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise DSDError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32.")
