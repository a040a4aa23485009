"""``python -m dsd_core memory``: the estimated peak VRAM of each memory preset (full-size DSD, no weights needed)."""

from __future__ import annotations


def add_parser(sub):
    return sub.add_parser("memory", help="print the estimated peak VRAM of each memory preset (full-size DSD, "
                                         "512x1024)")


def run(args) -> int:
    from ..memory.estimator import preset_table

    print(preset_table())
    return 0
