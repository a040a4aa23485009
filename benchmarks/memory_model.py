"""(d) The memory model of full-size DSD (dsd_core.memory.estimator), printed as markdown for the README.

Prints: resident weights per component and storage format; the estimated peak VRAM per preset (512x1024, one image;
also with batched true guidance); the phase breakdown. ``--measure`` checks the activation constant of the model
against torch's memory profiler on the CPU: one full-width (3072) single and double block, bf16, 2048 + 512 tokens
(about a minute on 2 cores).

Run: ``python benchmarks/memory_model.py [--measure]``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def measure_activation_factor(double: bool, width: int = 3072, heads: int = 24) -> float:
    """Peak bytes allocated during one block's forward / (N * D * bytes), from torch's memory profiler (CPU)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    from dsd_core.transformer import DSDTransformer2DModel

    ni, nt, dtype = 2048, 512, torch.bfloat16
    torch.manual_seed(0)
    m = DSDTransformer2DModel(in_channels=64, num_layers=int(double), num_single_layers=int(not double),
                              attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=256,
                              pooled_projection_dim=64, guidance_embeds=True,
                              axes_dims_rope=(16, 56, 56)).eval().to(dtype)
    kw = dict(hidden_states=torch.randn(1, ni, 64, dtype=dtype), condition_hidden_states=torch.randn(1, ni, 64,
                                                                                                     dtype=dtype),
              encoder_hidden_states=torch.randn(1, nt, 256, dtype=dtype), pooled_projections=torch.randn(1, 64,
                                                                                                         dtype=dtype),
              timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([3.5], dtype=dtype),
              txt_ids=torch.zeros(nt, 3), img_ids=torch.zeros(ni, 3), return_dict=False)
    with torch.no_grad():
        m(**kw)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            m(**kw)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    total = np.array(sizes).sum(1)
    return float((total.max() - total[0]) / ((ni + nt) * width * 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="measure the activation constant (slow)")
    args = ap.parse_args()

    from dsd_core.memory import PRESETS, MemoryConfig, estimate
    from dsd_core.memory.estimator import (ACTIVATION_FACTOR, CUDA_CONTEXT_GIB, PCIE_BYTES_PER_S, component_table,
                                           preset_table)

    print("## Resident weights per component (GiB; only nn.Linear weights quantized, as offline-testing.md §4)\n")
    print(component_table())
    print("\n## Presets: full-size DSD, 512x1024 canvas, one image, bf16 compute "
          f"(CUDA context {CUDA_CONTEXT_GIB} GiB included; transfers at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s)\n")
    print(preset_table())
    print("\n## Phases (GiB without the CUDA context) and peak with batched true guidance\n")
    print("| preset | encode text | encode reference | denoise | decode | peak | peak, batched true guidance |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        e = estimate(MemoryConfig.from_preset(name))
        b = estimate(MemoryConfig.from_preset(name), true_guidance=True, batch_true_guidance=True)
        p = e.phases
        print(f"| {name} | {p['encode_text']:.2f} | {p['encode_image']:.2f} | {p['denoise']:.2f} | {p['decode']:.2f} "
              f"| {e.peak:.2f} | {b.peak:.2f} |")
    if args.measure:
        single = measure_activation_factor(double=False)
        double = measure_activation_factor(double=True)
        print(f"\nactivation constant: measured {single:.1f} (single block), {double:.1f} (double block); "
              f"the model uses {ACTIVATION_FACTOR}")


if __name__ == "__main__":
    main()
