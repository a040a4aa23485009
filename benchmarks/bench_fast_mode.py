"""(b) Fast mode vs exact mode on the bench model (CPU): speed-up and PSNR against the exact output.

Rows: the true-guidance window alone, First Block Cache alone (several thresholds), ``SpeedConfig.fast()`` (the
cache at 0.08) and the fast mode plus the guidance window. PSNR is over the generated right panel in [0, 1], latent SNR over the final packed latents (signal = exact
latents; more sensitive than pixels through the random tiny VAE); "full passes" counts transformer passes that ran every
block (the cache skips the rest). Caveat: the bench model has RANDOM weights, whose block residuals change from step
to step very differently from a trained FLUX, so the cache's hit rate and the PSNR here only show the mechanism and
its cost model; quality must be judged on real weights (same script, real pipeline: see --help).

Run: ``python benchmarks/bench_fast_mode.py [--steps 28] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from _bench_model import HEIGHT, WIDTH, TransformerTimer, bench_pipeline, psnr, reference_image

from dsd_core.speed import SpeedConfig, apply_speed, disable_step_cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = bench_pipeline()
    image = reference_image()
    prompt = "a photo of the toy on a red chair in the forest"
    timer = TransformerTimer(pipe.transformer)
    full = {"n": 0}
    pipe.transformer.single_transformer_blocks[-1].proj_out.register_forward_pre_hook(
        lambda *a: full.__setitem__("n", full["n"] + 1))

    def run(speed: SpeedConfig):
        disable_step_cache(pipe.transformer)
        apply_speed(pipe, speed)
        best = None
        final = {}
        for _ in range(args.repeats):
            timer.reset()
            full["n"] = 0
            t0 = time.perf_counter()
            out = pipe(image, prompt, height=HEIGHT, width=WIDTH, num_inference_steps=args.steps,
                       image_guidance_scale=2.0, seed=1, output_type="pt", **speed.call_kwargs(args.steps),
                       progress_callback=lambda i, n, latents: final.__setitem__("latents", latents.clone()))
            took = time.perf_counter() - t0
            best = took if best is None else min(best, took)
        return best, timer.calls, full["n"], out.images, final["latents"]

    pipe(image, prompt, height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=0, output_type="pt")  # warm-up
    configs = [
        ("exact", SpeedConfig()),
        ("true guidance to 60 % of steps", SpeedConfig(true_guidance_end=0.6)),
        ("First Block Cache 0.05", SpeedConfig(first_block_cache=0.05)),
        ("First Block Cache 0.08", SpeedConfig(first_block_cache=0.08)),
        ("First Block Cache 0.15", SpeedConfig(first_block_cache=0.15)),
        ("First Block Cache 0.25", SpeedConfig(first_block_cache=0.25)),
        ("First Block Cache 0.5", SpeedConfig(first_block_cache=0.5)),
        ("First Block Cache 0.8", SpeedConfig(first_block_cache=0.8)),
        ("fast() = First Block Cache 0.08", SpeedConfig.fast()),
        ("fast(true_guidance_end=0.6)", SpeedConfig.fast(true_guidance_end=0.6)),
    ]
    print(f"bench model, {HEIGHT}x{WIDTH}, {args.steps} steps, true guidance s_i=2 (passes 3x from step 2), "
          f"{args.threads} threads; random weights (see caveat in the docstring)")
    print()
    print("| mode | s/image | speed-up | transformer calls | full passes | PSNR vs exact (dB) | latent SNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    exact_time = exact_img = exact_lat = None
    for label, speed in configs:
        took, calls, full_passes, img, lat = run(speed)
        if exact_img is None:
            exact_time, exact_img, exact_lat = took, img, lat
        p = psnr(img, exact_img)
        mse = float(((lat - exact_lat) ** 2).mean())
        snr = "exact" if mse == 0 else f"{10 * torch.log10(torch.tensor(float((exact_lat ** 2).mean()) / mse)):.1f}"
        print(f"| {label} | {took:.2f} | {exact_time / took:.2f}x | {calls} | {full_passes} | "
              f"{'exact' if p == float('inf') else f'{p:.1f}'} | {snr} |", flush=True)


if __name__ == "__main__":
    main()
