"""(e) DSD training at full size, estimated: peak VRAM per setting (the memory model of
``dsd_core/training/memory_estimate.py``) and time per sample from FLOP counts. Nothing is measured here (no GPU);
the README's training table comes from this script.

    python benchmarks/training_estimate.py [--utilisation 0.4]

Time model: one forward of the FLUX transformer costs 2 FLOP per parameter per token plus attention
(4 * tokens^2 * width per block); a training step costs ~3 forwards (forward + backward) plus one more forward when
gradient checkpointing recomputes the blocks. Throughput = peak bf16 dense TFLOPS x utilisation.
"""

from __future__ import annotations

import argparse

#: Peak dense bf16 tensor throughput (TFLOPS) from the vendors' data sheets.
GPUS = {"RTX 4090": 165.0, "RTX 3090": 71.0, "A100 80GB": 312.0, "H100 SXM": 989.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak reached (default 0.4)")
    args = ap.parse_args(argv)

    from dsd_core.memory.estimator import component_sizes
    from dsd_core.training.config import TrainConfig
    from dsd_core.training.memory_estimate import estimate_dsd_training
    from dsd_core.training.methods.dsd_lora import DSDLoRAOptions

    rows = [
        ("example config: fp8 transformer + fp8 text encoders, rank 32", dict(base_weights="fp8",
                                                                             text_encoder_weights="fp8"), {}),
        ("fp8 transformer, bf16 text encoders, rank 32", dict(base_weights="fp8"), {}),
        ("bf16 transformer, rank 32 (CLI defaults)", {}, {}),
        ("fp8 transformer, rank 512 (the paper's rank)", dict(base_weights="fp8"), dict(rank=512)),
        ("fp8 transformer, rank 512, 8-bit AdamW", dict(base_weights="fp8", optimizer="adamw8bit"), dict(rank=512)),
        ("fp8 transformer, rank 32, no gradient checkpointing", dict(base_weights="fp8", gradient_checkpointing=False),
         {}),
    ]
    print("| settings (512x1024 canvas, batch 1) | caching GiB | training GiB | peak GiB (estimate) |")
    print("|---|---|---|---|")
    for name, cfg, opts in rows:
        e = estimate_dsd_training(TrainConfig(data="d", output="o", from_flux="f", **cfg), DSDLoRAOptions(**opts))
        print(f"| {name} | {e.encoding_gib:.1f} | {e.training_gib:.1f} | {e.peak_gib:.1f} |")

    t = component_sizes()["transformer"]
    tokens, width, blocks = 2048 + 512, 3072, t.blocks
    forward = 2 * t.params * tokens + 4 * tokens**2 * width * blocks
    step = forward * 4  # forward + backward (~2x) + checkpoint recompute
    print(f"\nFLUX transformer: {t.params / 1e9:.1f} B parameters, {tokens} tokens: {forward / 1e12:.0f} TFLOP per "
          f"forward, ~{step / 1e12:.0f} TFLOP per training sample (gradient checkpointing)\n")
    print(f"| GPU | s per sample at {args.utilisation:.0%} of peak bf16 (estimate) |")
    print("|---|---|")
    for gpu, tflops in GPUS.items():
        print(f"| {gpu} | {step / (tflops * 1e12 * args.utilisation):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
