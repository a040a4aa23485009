"""``python -m dsd_core tiny-model OUT_DIR``: a tiny random DSD model set for tests and demos (images are noise)."""

from __future__ import annotations

import os


def add_parser(sub):
    p = sub.add_parser("tiny-model", help="write a tiny random DSD model set (for tests and demos; images are noise)")
    p.add_argument("out_dir", help="new folder to write base/, dsd/ and reference.png into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comfy-files", action="store_true",
                   help="also write the same weights as ComfyUI single files under OUT_DIR/comfyui_models")
    return p


def run(args) -> int:
    from ..tiny import write_tiny_comfy_files, write_tiny_model

    paths = write_tiny_model(args.out_dir, seed=args.seed)
    if args.comfy_files:
        files = write_tiny_comfy_files(os.path.join(args.out_dir, "comfyui_models"), seed=args.seed)
        paths.update({f"comfy {k}": v for k, v in files.items()})
    if args.quiet:
        print(args.out_dir)
        return 0
    print(f"wrote a tiny DSD model set with random weights (its images are noise) to {args.out_dir}:")
    for k, v in paths.items():
        print(f"  {k:12s} {v}")
    return 0
