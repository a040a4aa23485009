"""CLI subcommands for the ComfyUI-native path (files users already have):

    python -m dsd_core extract-c-embedder DSD_TRANSFORMER.safetensors OUT.safetensors
    python -m dsd_core compare-transformers DSD_TRANSFORMER.safetensors flux1-dev.safetensors

``extract-c-embedder`` writes DSD's extra layer (two tensors, ~0.4 MB at full size) as a small patch file for the
*DSD Apply (native)* node. ``compare-transformers`` streams two transformer files tensor by tensor (never more than one
stored tensor of each in memory) and tells whether they are equal apart from ``c_embedder``: exit 0 if so, 1 if not.
"""

from __future__ import annotations

import sys

COMMANDS = ("extract-c-embedder", "compare-transformers")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("extract-c-embedder",
                              help="write the c_embedder patch (~0.4 MB) of a DSD transformer file for the native nodes")
    p.add_argument("transformer", help="the DSD transformer .safetensors (diffusers or BFL/ComfyUI layout, fp8 too)")
    p.add_argument("out", help="the patch to write, e.g. ComfyUI/models/dsd/dsd_c_embedder.safetensors")
    p = subparsers.add_parser("compare-transformers",
                              help="stream-compare two transformer files: equal apart from c_embedder? (exit 0/1)")
    p.add_argument("a", help="e.g. the DSD transformer .safetensors")
    p.add_argument("b", help="e.g. flux1-dev.safetensors (layouts may differ)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .. import native

    if args.command == "extract-c-embedder":
        path = native.extract_c_embedder(args.transformer, args.out)
        emb = native.read_c_embedder(path, dtype=None)
        print(f"wrote {path}: c_embedder {tuple(emb.weight.shape)} {str(emb.weight.dtype).replace('torch.', '')}")
        return 0
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc="comparing", unit="tensor", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = native.compare_transformers(args.a, args.b, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(result.summary())
    return 0 if result.equal_apart_from_c_embedder else 1
