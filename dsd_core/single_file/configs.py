"""The shipped full-size configs (``dsd_core/configs/*.json``)."""

from __future__ import annotations

import json
import os

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
