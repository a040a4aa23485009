"""(c) Peak host memory (RSS) while loading a multi-GB DSD transformer, divided by the file size.

Writes a full-width DSD transformer (inner dim 3072, 1 double + 3 single blocks, c_embedder; ~0.83 B parameters,
~1.7 GB in bf16) as a diffusers folder to /tmp, then loads it in fresh subprocesses and reports, per loading path,
the peak RSS above the process's RSS before loading (``VmHWM``; mmap'd file pages that were touched count too),
the RSS right after loading (diffusers maps bf16 safetensors without copying, so untouched weights are not resident
yet) and after touching every weight once (as moving them to a GPU does), each divided by the file size. A ratio near 1.0 means streaming (no second copy); 2.0 means
the whole file was held twice at some point.

Run: ``python benchmarks/bench_load_rss.py [--gguf] [--keep]`` (--gguf also writes and loads a Q8_0 GGUF; slow:
the gguf package quantizes in numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = "/tmp/dsd-bench-load"
CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=3, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=[16, 56, 56])

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import psutil, torch
import diffusers, transformers  # imports before the baseline
from dsd_core.memory import MemoryConfig
from dsd_core.memory.apply import FP8_KEEP_TRANSFORMER, cast_fp8, load_transformer
from dsd_core.sources import Parts
from dsd_core.transformer import DSDTransformer2DModel
torch.set_num_threads(2)
mode, folder, gguf = sys.argv[1], sys.argv[2], sys.argv[3]
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if mode == "gguf":
    cfg = MemoryConfig(transformer_weights="gguf", gguf_file=gguf)
else:
    cfg = MemoryConfig(transformer_weights={{"bf16": "native", "fp8": "native"}}.get(mode, mode))
def from_folder(dtype, qc):  # the transformer part of a FolderSource
    return DSDTransformer2DModel.from_pretrained(folder, dtype=dtype, **({{"quantization_config": qc}} if qc else {{}}))
parts = Parts(transformer_config=folder, lora=None, components=None, transformer=from_folder)
model = load_transformer(cfg, parts, torch.bfloat16, "cpu")
if mode == "fp8":
    cast_fp8(model, torch.bfloat16, FP8_KEEP_TRANSFORMER)
took = time.perf_counter() - t0
def hwm():  # this process's own high-water mark (ru_maxrss would include the parent's, kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
peak = hwm()
after = psutil.Process().memory_info().rss
with torch.no_grad():  # touch every weight, as moving them to a GPU would
    for p in model.parameters():
        try:
            p.float().sum()
        except (NotImplementedError, RuntimeError, IndexError):  # quantized subclasses: already materialized
            pass
touched = psutil.Process().memory_info().rss
print(json.dumps(dict(before=before, peak=peak, after=after, touched=touched, peak_touched=hwm(), seconds=took)))
"""


def write_model(folder: str) -> int:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, ROOT)
    from dsd_core.transformer import DSDTransformer2DModel

    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        meta = DSDTransformer2DModel(**CONFIG)
    g = torch.Generator().manual_seed(0)
    state = {n: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) for n, p in meta.state_dict().items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "DSDTransformer2DModel", **CONFIG}, f)
    return sum(t.numel() for t in state.values())


def write_gguf(folder: str, path: str) -> None:
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, ROOT)
    from dsd_core.memory.gguf import save_gguf

    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    save_gguf({k: v.to(torch.float32) for k, v in state.items()}, path, "Q8_0")


def measure(mode: str, folder: str, gguf: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), mode, folder, gguf],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", action="store_true", help="also write and load a Q8_0 GGUF (slow)")
    ap.add_argument("--keep", action="store_true", help=f"keep {OUT} afterwards")
    args = ap.parse_args()
    folder = os.path.join(OUT, "transformer")
    gguf = os.path.join(OUT, "dsd-bench-Q8_0.gguf")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        n = write_model(folder)
        print(f"wrote {n / 1e9:.2f} B parameters in {time.perf_counter() - t0:.0f} s")
    size = os.path.getsize(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    modes = [("bf16", "from_pretrained, bf16 (streamed from the mmap'd file)", size),
             ("fp8", "bf16 load, then fp8 layerwise casting", size)]
    try:
        import torchao  # noqa: F401
        modes.append(("int8", "torchao int8 quantized while loading", size))
    except ImportError:
        print("torchao not installed: int8 row skipped")
    if args.gguf:
        if not os.path.isfile(gguf):
            t1 = time.perf_counter()
            write_gguf(folder, gguf)
            print(f"wrote the Q8_0 GGUF in {time.perf_counter() - t1:.0f} s")
        modes.append(("gguf", "GGUF Q8_0 (diffusers GGUFQuantizationConfig)", os.path.getsize(gguf)))
    print(f"file: {size / 1e9:.2f} GB bf16 safetensors ({folder})")
    print()
    print("| loading path | file GB | load s | peak RSS while loading (÷ file) | RSS after load (÷ file) "
          "| RSS after touching all weights (÷ file) | peak incl. touching (÷ file) |")
    print("|---|---|---|---|---|---|---|")
    for mode, label, fsize in modes:
        r = measure(mode, folder, gguf)
        cells = [r[k] - r["before"] for k in ("peak", "after", "touched", "peak_touched")]
        print(f"| {label} | {fsize / 1e9:.2f} | {r['seconds']:.1f} | "
              + " | ".join(f"{c / 1e9:.2f} GB ({c / fsize:.2f})" for c in cells) + " |", flush=True)
    if not args.keep:
        shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
