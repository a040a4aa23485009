"""Command line: ``python -m dsd_core generate ...`` and ``python -m dsd_core tiny-model OUT_DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

from .errors import DSDError

logger = logging.getLogger("dsd_core")


def _add_generate(sub) -> None:
    from .canvas import TRAINED_PANEL
    from .image import FIT_MODES, RESAMPLE_FILTERS
    from .loading import DEFAULT_BASE, DEFAULT_MODEL, DTYPES

    p = sub.add_parser("generate", help="generate images of the reference's subject",
                       description="Generate an image of the reference's subject doing what the prompt says. "
                                   "Defaults are the official DSD settings (28 steps, guidance 3.5, 512x1024).")
    p.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP)")
    p.add_argument("--prompt", required=True, help="what to generate, e.g. 'this cat wearing a wizard hat'")
    p.add_argument("--out", required=True, help="output PNG; with --num-images N>1, OUT_1.png ... are added")
    g = p.add_argument_group("model")
    g.add_argument("--base", default=DEFAULT_BASE, help=f"FLUX.1-dev diffusers folder or HF repo id (default {DEFAULT_BASE}); "
                                                        "only its VAE, text encoders, tokenizers and scheduler are used")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"folder or HF repo id holding transformer/ and the LoRA (default {DEFAULT_MODEL})")
    g.add_argument("--transformer", help="DSD transformer folder (overrides the one in --model)")
    g.add_argument("--lora", help="DSD LoRA .safetensors (overrides the one in --model)")
    f = p.add_argument_group("single files (instead of --base/--model; e.g. ComfyUI's model files, nothing downloaded)")
    f.add_argument("--transformer-file", help="the DSD transformer as one .safetensors (diffusers or FLUX layout, bf16/fp8)")
    f.add_argument("--clip-l", help="clip_l.safetensors")
    f.add_argument("--t5xxl", help="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn(_scaled).safetensors")
    f.add_argument("--vae-file", help="ae.safetensors")
    f.add_argument("--tokenizers", help="folder with the CLIP-L and T5 tokenizers (clip/ + t5/, a diffusers FLUX "
                                        "folder, or a ComfyUI folder); default: search ComfyUI / local caches")
    g.add_argument("--no-lora", action="store_true", help="run without the LoRA (not the DSD model; for comparisons)")
    g.add_argument("--lora-scale", type=float, default=None, help="LoRA multiplier (default 1.0, the reference)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU (the reference), float32 on CPU")
    g.add_argument("--device", choices=["cuda", "cpu", "mps"], help="default: cuda if available, else mps, else cpu")
    from .memory.config import OFFLOAD_MODES, PRESETS, TEXT_ENCODER_WEIGHTS, TRANSFORMER_WEIGHTS
    from .speed import COMPILE_MODES

    m = p.add_argument_group("memory and speed (see `python -m dsd_core memory` for the estimates)")
    m.add_argument("--memory", choices=list(PRESETS), default=None,
                   help="a preset by GPU size: " + "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items()))
    m.add_argument("--offload", choices=OFFLOAD_MODES, default=None,
                   help="model: one component on the GPU at a time; group: block by block; sequential: layer by "
                        "layer (least memory, slowest); overrides the preset's")
    m.add_argument("--transformer-weights", choices=TRANSFORMER_WEIGHTS, default=None,
                   help="transformer weight storage (fp8: float8, upcast per layer; int8/int4: torchao; nf4: "
                        "bitsandbytes, CUDA; gguf: see --gguf); overrides the preset's")
    m.add_argument("--text-encoder-weights", choices=TEXT_ENCODER_WEIGHTS, default=None,
                   help="T5/CLIP weight storage; overrides the preset's")
    m.add_argument("--gguf", default=None, help="a GGUF quant of the DSD transformer (replaces its transformer/)")
    m.add_argument("--fuse-lora", action="store_true", default=None, help="merge the LoRA into the weights")
    m.add_argument("--release-text-encoders", action="store_true", default=None,
                   help="free the text encoders once the prompt is encoded")
    m.add_argument("--fast", action="store_true", help="fast mode: First Block Cache (lossy, see the README)")
    m.add_argument("--compile", choices=COMPILE_MODES, default="off", help="torch.compile the transformer")
    m.add_argument("--attention-backend", default=None, help="a diffusers attention backend (default: torch SDPA)")
    g.add_argument("--offline", action="store_true", help="never download (also: HF_HUB_OFFLINE=1)")
    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=None, help="seed; image k uses seed+k (default: random, printed)")
    s.add_argument("--num-images", type=int, default=1, help="images per run (seeds S, S+1, ...)")
    s.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    s.add_argument("--guidance", type=float, default=3.5, help="FLUX distilled guidance (default 3.5)")
    s.add_argument("--image-guidance", type=float, default=1.0,
                   help="true image guidance s_i; > 1 turns true guidance on (3 passes per step); default 1.0")
    s.add_argument("--text-guidance", type=float, default=1.0,
                   help="true text guidance s_t; only acts when --image-guidance > 1 (as in the reference)")
    s.add_argument("--true-guidance-start", type=int, default=2, help="first step with true guidance (reference 2)")
    s.add_argument("--batch-true-guidance", action="store_true", help="run the 3 passes as one batch (faster, more memory)")
    s.add_argument("--height", type=int, default=TRAINED_PANEL, help="canvas height (default 512)")
    s.add_argument("--width", type=int, default=2 * TRAINED_PANEL, help="canvas width = two panels (default 1024)")
    s.add_argument("--condition-sampling", choices=["sample", "mode"], default="sample",
                   help="sample: VAE posterior sample (reference); mode: posterior mean")
    s.add_argument("--fit", choices=FIT_MODES, default="center_crop", help="how the reference fills its panel")
    s.add_argument("--resample", choices=sorted(RESAMPLE_FILTERS), default="bicubic", help="resize filter")
    e = p.add_argument_group("prompt enhancement (off by default)")
    e.add_argument("--enhance-prompt", choices=["gemini", "local"], default=None,
                   help="rewrite the prompt from the reference image first: gemini (key from GEMINI_API_KEY / "
                        "GOOGLE_API_KEY or DSD_GEMINI_KEY_FILE) or local (a vision-language model folder)")
    e.add_argument("--enhance-model", default=None, help="Gemini model name (default: DSD_GEMINI_MODEL or the current default)")
    e.add_argument("--local-vlm", default=None, help="folder of the local vision-language model (--enhance-prompt local)")
    o = p.add_argument_group("output")
    o.add_argument("--save-panel", action="store_true", help="also save the full canvas as OUT_panel.png")
    o.add_argument("--save-reference", action="store_true",
                   help="also save the model's reconstruction of the reference as OUT_reference.png")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_memory(sub) -> None:
    sub.add_parser("memory", help="print the estimated peak VRAM of each memory preset (full-size DSD, 512x1024)")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny random DSD model set (for tests and demos; images are noise)")
    p.add_argument("out_dir", help="new folder to write base/, dsd/ and reference.png into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comfy-files", action="store_true",
                   help="also write the same weights as ComfyUI single files under OUT_DIR/comfyui_models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsd_core",
                                     description="Diffusion Self-Distillation: subject-preserving generation on FLUX.1-dev.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_tiny(sub)
    _add_memory(sub)
    from .training import cli as train_cli  # `train`: its own module (add_parser / run)

    train_cli.add_parser(sub)
    from .distill import cli as distill_cli  # python -m dsd_core distill data|prune|train|eval

    distill_cli.add_parser(sub)
    return parser


def output_paths(out: str, n: int, suffix: str = "") -> list[str]:
    stem, ext = os.path.splitext(out)
    ext = ext or ".png"
    return [f"{stem}{suffix}{ext}" if k == 0 else f"{stem}_{k}{suffix}{ext}" for k in range(n)]


def save_png(image, path: str, metadata: dict) -> None:
    """Write a PNG with a ``dsd`` text chunk (settings, seed, versions), atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dsd", json.dumps(metadata, sort_keys=True))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def memory_config(args):
    """The MemoryConfig the flags describe: the preset (default: no savings) with the given switches changed."""
    from .memory.config import MemoryConfig

    switches = {k: v for k, v in dict(offload=args.offload, transformer_weights=args.transformer_weights,
                                       text_encoder_weights=args.text_encoder_weights, gguf_file=args.gguf,
                                       fuse_lora=args.fuse_lora,
                                       release_text_encoders=args.release_text_encoders).items() if v is not None}
    return MemoryConfig.from_preset(args.memory or "full", **switches)


def speed_config(args):
    import dataclasses

    from .speed import SpeedConfig

    base = SpeedConfig.fast() if args.fast else SpeedConfig()
    return dataclasses.replace(base, compile=args.compile, attention_backend=args.attention_backend)


def run_generate(args) -> int:
    import diffusers
    import torch

    from . import __version__
    from .canvas import check_canvas_size
    from .image import load_image, prepare_reference
    from .loading import load_pipeline

    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    check_canvas_size(args.height, args.width)
    reference = prepare_reference(load_image(args.image), args.height, args.width // 2, mode=args.fit,
                                  resample=args.resample)
    prompt = args.prompt
    if args.enhance_prompt:  # before loading DSD, so a local VLM never shares memory with it
        from .prompt import enhance_prompt

        result = enhance_prompt(reference, prompt, backend=args.enhance_prompt, model=args.enhance_model,
                                local_model_path=args.local_vlm)
        if result.enhanced:
            print(f"enhanced prompt ({result.backend}{', cached' if result.cached else ''}): {result.prompt}")
            prompt = result.prompt
        else:
            print(f"prompt not enhanced: {result.warning}", file=sys.stderr)
    t0 = time.perf_counter()
    files = [args.transformer_file, args.clip_l, args.t5xxl, args.vae_file]
    if any(files):
        if not all(files):
            raise DSDError("single-file loading needs all of --transformer-file, --clip-l, --t5xxl and --vae-file.")
        from .single_file import load_pipeline_from_files

        pipe = load_pipeline_from_files(*files, lora=None if args.no_lora else args.lora, dtype=args.dtype,
                                        device=args.device, tokenizer_dirs=args.tokenizers,
                                        memory=memory_config(args), speed=speed_config(args))
    else:
        pipe = load_pipeline(base=args.base, model=args.model, transformer=args.transformer,
                             lora=False if args.no_lora else args.lora, dtype=args.dtype, device=args.device,
                             local_files_only=args.offline or None, memory=memory_config(args),
                             speed=speed_config(args))
    pipe.set_progress_bar_config(disable=args.quiet)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe(reference, prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
               guidance_scale=args.guidance, image_guidance_scale=args.image_guidance,
               text_guidance_scale=args.text_guidance, true_guidance_start_step=args.true_guidance_start,
               seed=args.seed, num_images_per_prompt=args.num_images, condition_sampling=args.condition_sampling,
               lora_scale=args.lora_scale, batch_true_guidance=args.batch_true_guidance)
    gen_s = time.perf_counter() - t0
    settings = {
        "prompt": out.prompt, "user_prompt": args.prompt, "enhance_prompt": args.enhance_prompt,
        "steps": args.steps, "guidance": args.guidance, "image_guidance": args.image_guidance,
        "text_guidance": args.text_guidance, "true_guidance_start": args.true_guidance_start,
        "height": args.height, "width": args.width, "condition_sampling": args.condition_sampling,
        "fit": args.fit, "resample": args.resample, "lora_scale": args.lora_scale, "no_lora": args.no_lora,
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""), "base": args.base, "model": args.model,
        "transformer": args.transformer or args.transformer_file, "lora": args.lora,
        "memory": pipe.memory_config.describe(), "fast": args.fast, "compile": args.compile,
        "versions": {"dsd_core": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    paths = output_paths(args.out, len(out.images))
    for k, path in enumerate(paths):
        meta = dict(settings, seed=out.seeds[k])
        save_png(out.images[k], path, meta)
        if args.save_panel:
            save_png(out.panels[k], output_paths(path, 1, "_panel")[0], meta)
        if args.save_reference:
            save_png(out.references[k], output_paths(path, 1, "_reference")[0], meta)
        print(f"saved {path} (seed {out.seeds[k]})")
    print(f"loaded in {load_s:.1f} s, generated in {gen_s:.1f} s")
    return 0


def run_tiny(args) -> int:
    from .tiny import write_tiny_comfy_files, write_tiny_model

    paths = write_tiny_model(args.out_dir, seed=args.seed)
    if args.comfy_files:
        files = write_tiny_comfy_files(os.path.join(args.out_dir, "comfyui_models"), seed=args.seed)
        paths.update({f"comfy {k}": v for k, v in files.items()})
    print(f"wrote a tiny DSD model set with random weights (its images are noise) to {args.out_dir}:")
    for k, v in paths.items():
        print(f"  {k:12s} {v}")
    return 0


def run_memory(args) -> int:
    from .memory import preset_table

    print(preset_table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.command == "train":
            from .training import cli as train_cli

            return train_cli.run(args)
        if args.command == "distill":
            from .distill import cli as distill_cli

            return distill_cli.run(args)
        return {"generate": run_generate, "tiny-model": run_tiny, "memory": run_memory}[args.command](args)
    except (DSDError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
