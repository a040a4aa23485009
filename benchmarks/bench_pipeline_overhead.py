"""(a) DSDPipeline vs a reference-style loop, true guidance on and off, on the bench model (CPU).

The reference-style loop is written the way the official FluxConditionalPipeline runs (shared/docs/dsd-reference.md
section 2): the three true-guidance passes one after another, the condition embedding (c_embedder) recomputed on
every pass, the guidance tensor and the zero condition rebuilt every step. Both share the same text encoders, VAE,
scheduler and transformer, so the difference is only how the loop drives them.

Printed per configuration: wall time per image, time inside the transformer, pipeline overhead = total / transformer
time, and ours vs reference. Run: ``python benchmarks/bench_pipeline_overhead.py [--steps 8] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _bench_model import HEIGHT, WIDTH, TransformerTimer, bench_pipeline, reference_image


@torch.no_grad()
def reference_loop(pipe, image, prompt, steps, guidance_scale, s_i, s_t, seed):
    """The official pipeline's order of work, without DSDPipeline's caching or batching."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    from dsd_core import canvas as cv

    device, dtype = pipe._execution_device, pipe.transformer.dtype
    emb, pooled, txt_ids = pipe.encode_prompt(prompt, prompt_2=None, device=device)
    if s_i > 1.0:
        nemb, npooled, _ = pipe.encode_prompt("", prompt_2=None, device=device)
    ref = pipe._reference_tensor(image, HEIGHT, WIDTH // 2, "center_crop")
    cond = pipe.prepare_condition(ref, [seed], "sample", device=device, dtype=dtype)
    x = pipe.prepare_noise([seed], HEIGHT, WIDTH, device=device, dtype=dtype)
    ids = cv.latent_image_ids(HEIGHT, WIDTH, device, dtype, pipe.vae_scale_factor)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ts, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas,
                               mu=cv.compute_mu(x.shape[1], pipe.scheduler.config))
    for i, t in enumerate(ts):
        timestep = t.expand(x.shape[0]).to(x.dtype)
        guidance = torch.tensor([guidance_scale], device=device, dtype=torch.float32).expand(x.shape[0])

        def f(e, p, c):
            return pipe.transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance,
                                    pooled_projections=p, encoder_hidden_states=e, txt_ids=txt_ids, img_ids=ids,
                                    condition_hidden_states=c, return_dict=False)[0]

        v = f(emb, pooled, cond)
        if s_i > 1.0 and i >= 2:
            vu = f(nemb, npooled, torch.zeros_like(cond))
            vi = f(nemb, npooled, cond)
            v = vu + s_i * (vi - vu) + s_t * (v - vi)
        x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
    panels = pipe.decode(x, HEIGHT, WIDTH)
    return pipe.image_processor.postprocess(panels, output_type="pt")


def timed(fn, timer, repeats):
    totals, inner = [], []
    for _ in range(repeats):
        timer.reset()
        t0 = time.perf_counter()
        out = fn()
        totals.append(time.perf_counter() - t0)
        inner.append(timer.seconds)
    return statistics.median(totals), statistics.median(inner), timer.calls, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = bench_pipeline()
    image = reference_image()
    timer = TransformerTimer(pipe.transformer)
    prompt = "a photo of the toy on a red chair in the forest"
    print(f"bench transformer: {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f} M params, "
          f"{HEIGHT}x{WIDTH} canvas = {(HEIGHT // 16) * (WIDTH // 16)} image + 512 text tokens, {args.steps} steps, "
          f"{args.threads} threads, median of {args.repeats}")
    # warm-up (allocator, first-call costs)
    pipe(image, prompt, height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=0, output_type="pt")

    rows = []
    for label, s_i in (("true guidance off", 1.0), ("true guidance on (s_i=2)", 2.0)):
        common = dict(steps=args.steps, guidance_scale=3.5, s_i=s_i, s_t=1.0, seed=1)
        ref = timed(lambda: reference_loop(pipe, image, prompt, **common), timer, args.repeats)
        ours = timed(lambda: pipe(image, prompt, height=HEIGHT, width=WIDTH, num_inference_steps=args.steps,
                                  image_guidance_scale=s_i, seed=1, output_type="pt").panels, timer, args.repeats)
        same = torch.allclose(ref[3].float(), ours[3].float(), atol=1e-5)
        rows.append((label, "reference-style loop", ref))
        rows.append((label, "DSDPipeline", ours))
        if s_i > 1:
            bat = timed(lambda: pipe(image, prompt, height=HEIGHT, width=WIDTH, num_inference_steps=args.steps,
                                     image_guidance_scale=s_i, seed=1, output_type="pt",
                                     batch_true_guidance=True).panels, timer, args.repeats)
            rows.append((label, "DSDPipeline, batched true guidance", bat))
        print(f"{label}: outputs equal (atol 1e-5): {same}")

    print()
    print("| guidance | implementation | total s/image | transformer s | passes | overhead (total / transformer) "
          "| vs reference |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for label, impl, (total, inner, calls, _) in rows:
        base.setdefault(label, total)
        print(f"| {label} | {impl} | {total:.2f} | {inner:.2f} | {calls} | {total / inner:.3f} | "
              f"{base[label] / total:.2f}x |")


if __name__ == "__main__":
    main()
