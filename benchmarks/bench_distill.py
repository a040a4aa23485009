"""(e) Distilled students vs the full DSD transformer: parameters, memory (estimated at full size) and measured
per-step time ratio, per preset.

    python benchmarks/bench_distill.py                      # CPU: full depth (19 + 38 blocks), narrow width
    python benchmarks/bench_distill.py --device cuda --width 3072 --dtype bfloat16   # a GPU, the real model size

The teacher has FLUX's full block structure and the real token counts of a 512x1024 canvas (2048 image + 512 text
tokens); on the CPU its width is narrowed (default 128) so one forward takes seconds. Each student is built from it
by :func:`dsd_core.distill.student.build_student` (uniform selection) and timed on the same input, interleaved with
the teacher (median of ``--repeats``). Full-size parameters, bf16 size and peak VRAM are the memory model's estimates
for the same block counts (LoRA fused). Random weights: only the timings mean anything.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def bench_inputs(width_tokens: int, text_tokens: int, device, dtype, cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    rows, cols = 32, width_tokens // 32
    img_ids = torch.zeros(rows * cols, 3)
    img_ids[:, 1] = torch.arange(rows * cols) // cols
    img_ids[:, 2] = torch.arange(rows * cols) % cols
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return dict(hidden_states=r(1, rows * cols, 64), condition_hidden_states=r(1, rows * cols, 64),
                encoder_hidden_states=r(1, text_tokens, cfg["joint_attention_dim"]),
                pooled_projections=r(1, cfg["pooled_projection_dim"]), timestep=torch.tensor([0.5], device=device),
                guidance=torch.tensor([3.5], device=device), img_ids=img_ids.to(device),
                txt_ids=torch.zeros(text_tokens, 3, device=device), return_dict=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--width", type=int, default=128, help="inner dim of the bench teacher, a multiple of 128 "
                                                            "(full size: 3072)")
    ap.add_argument("--image-tokens", type=int, default=2048, help="2048 = a 512x1024 canvas")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="half,quarter")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from dsd_core.distill.evaluate import estimated_memory, estimated_step_ratio, full_size_transformer, speed_ratio
    from dsd_core.distill.layout import StudentLayout
    from dsd_core.distill.student import build_student, count_params
    from dsd_core.memory.estimator import _config
    from dsd_core.transformer import DSDTransformer2DModel

    dtype = getattr(torch, args.dtype)
    full = _config("transformer")
    if args.width % 128:
        ap.error("--width must be a multiple of 128 (FLUX's head size)")
    cfg = dict(full, num_attention_heads=args.width // 128,
               joint_attention_dim=full["joint_attention_dim"] if args.width == 3072 else 64,
               pooled_projection_dim=full["pooled_projection_dim"] if args.width == 3072 else 64)
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = DSDTransformer2DModel(**cfg).to(dtype).eval()
    inputs = bench_inputs(args.image_tokens, args.text_tokens, args.device, dtype, cfg)
    teacher_full = full_size_transformer(19, 38)
    print(f"bench teacher: {cfg['num_layers']} + {cfg['num_single_layers']} blocks, width {args.width}, "
          f"{count_params(teacher):,} parameters, {args.image_tokens} + {args.text_tokens} tokens, {args.device} "
          f"{args.dtype}\n")
    print("| preset | blocks kept (double + single) | full-size params | bf16 file | est. peak VRAM, no offload | "
          "est. peak VRAM, 12gb preset (fp8) | est. step time ratio | measured step time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("full (teacher)", 19, 38, 1.0)]
    for preset in args.presets.split(","):
        layout = StudentLayout.from_preset(preset, 19, 38)
        student = build_student(teacher, layout)
        with torch.no_grad():
            measured = speed_ratio(student, teacher, inputs, repeats=args.repeats)
        rows.append((preset, len(layout.double), len(layout.single), measured["ratio"]))
        del student
    for name, nd, ns, ratio in rows:
        size = full_size_transformer(nd, ns)
        print(f"| {name} | {nd} + {ns} | {size.params / 1e9:.2f} B ({size.params / teacher_full.params:.0%}) | "
              f"{size.weight_bytes('bf16') / 1e9:.1f} GB | {estimated_memory(nd, ns, 'full').peak:.1f} GiB | "
              f"{estimated_memory(nd, ns, '12gb').phases['denoise'] + 0.4:.1f} GiB while denoising | "
              f"{estimated_step_ratio(nd, ns):.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
