"""``python -m dsd_core generate``: images of the reference's subject doing what the prompt says.

The flags become typed settings at once (a model source, a MemoryConfig, a SpeedConfig, a dtype), so a bad value
fails before anything is loaded; the help texts come from the option lists (:mod:`dsd_core.options`) and the
configs' own field descriptions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .. import options
from ..errors import DSDError


def add_parser(sub):
    from ..memory.config import OFFLOAD_MODES, PRESETS, TEXT_ENCODER_WEIGHTS, TRANSFORMER_WEIGHTS, MemoryConfig
    from ..sources import DEFAULT_BASE, DEFAULT_MODEL
    from ..speed import COMPILE_MODES, SPEED_MODES, SpeedConfig

    memory_help, speed_help = MemoryConfig.help(), SpeedConfig.help()
    p = sub.add_parser("generate", help="generate images of the reference's subject",
                       description="Generate an image of the reference's subject doing what the prompt says. "
                                   f"Defaults are the official DSD settings ({options.STEPS} steps, guidance "
                                   f"{options.GUIDANCE}, {options.PANEL}x{2 * options.PANEL}).")
    p.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP)")
    p.add_argument("--prompt", required=True, help="what to generate, e.g. 'this cat wearing a wizard hat'")
    p.add_argument("--out", required=True, help="output PNG; with --num-images N>1, OUT_1.png ... are added")
    g = p.add_argument_group("model")
    g.add_argument("--base", default=DEFAULT_BASE, help=f"FLUX.1-dev diffusers folder or HF repo id (default "
                                                        f"{DEFAULT_BASE}); only its VAE, text encoders, tokenizers "
                                                        "and scheduler are used")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"folder or HF repo id holding transformer/ and the LoRA (default {DEFAULT_MODEL})")
    g.add_argument("--transformer", help="DSD transformer folder (overrides the one in --model)")
    g.add_argument("--lora", help="DSD LoRA .safetensors (overrides the one in --model)")
    f = p.add_argument_group("single files (instead of --base/--model; e.g. ComfyUI's model files, nothing downloaded)")
    f.add_argument("--transformer-file", help="the DSD transformer as one .safetensors (diffusers or FLUX layout, "
                                              "bf16/fp8) or a .gguf quant of it")
    f.add_argument("--clip-l", help="clip_l.safetensors")
    f.add_argument("--t5xxl", help="t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn(_scaled).safetensors")
    f.add_argument("--vae-file", help="ae.safetensors")
    f.add_argument("--tokenizers", help="folder with the CLIP-L and T5 tokenizers (clip/ + t5/, a diffusers FLUX "
                                        "folder, or a ComfyUI folder); default: search ComfyUI / local caches")
    g.add_argument("--no-lora", action="store_true", help="run without the LoRA (not the DSD model; for comparisons)")
    g.add_argument("--lora-scale", type=float, default=None,
                   help=f"LoRA multiplier (default {options.LORA_SCALE}, the reference)")
    g.add_argument("--dtype", choices=options.DTYPE_CHOICES, default="auto", help=options.DTYPE_HELP)
    g.add_argument("--device", choices=options.DEVICES, help="default: cuda if available, else mps, else cpu")
    g.add_argument("--offline", action="store_true", help="never download (also: HF_HUB_OFFLINE=1)")

    m = p.add_argument_group("memory and speed (see `python -m dsd_core memory` for the estimates); a flag "
                             "overrides the preset's setting")
    m.add_argument("--memory", choices=list(PRESETS), default=None,
                   help="a preset by GPU size: " + "; ".join(f"{k}: {v.summary}" for k, v in PRESETS.items())
                        + ". With --gguf FILE a preset uses that GGUF quant of the transformer.")
    m.add_argument("--offload", choices=OFFLOAD_MODES, default=None, help=memory_help["offload"])
    m.add_argument("--transformer-weights", choices=TRANSFORMER_WEIGHTS, default=None,
                   help=memory_help["transformer_weights"].replace("see gguf_file", "see --gguf"))
    m.add_argument("--text-encoder-weights", choices=TEXT_ENCODER_WEIGHTS, default=None,
                   help=memory_help["text_encoder_weights"])
    m.add_argument("--gguf", default=None, metavar="FILE",
                   help=memory_help["gguf_file"].replace(" for transformer_weights='gguf'", "")
                   + "; replaces the transformer weights")
    m.add_argument("--fuse-lora", action="store_true", default=None, help=memory_help["fuse_lora"])
    m.add_argument("--release-text-encoders", action="store_true", default=None,
                   help=memory_help["release_text_encoders"])
    m.add_argument("--fast", action="store_true", help=f"fast mode: {SPEED_MODES['fast']}")
    m.add_argument("--compile", choices=COMPILE_MODES, default="off", help=speed_help["compile"])
    m.add_argument("--attention-backend", default=None, help=speed_help["attention_backend"])

    s = p.add_argument_group("sampling")
    s.add_argument("--seed", type=int, default=None, help="seed; image k uses seed+k (default: random, printed)")
    s.add_argument("--num-images", type=int, default=1, help="images per run (seeds S, S+1, ...)")
    s.add_argument("--steps", type=int, default=options.STEPS, help=f"denoising steps (default {options.STEPS})")
    s.add_argument("--guidance", type=float, default=options.GUIDANCE,
                   help=f"FLUX distilled guidance (default {options.GUIDANCE})")
    s.add_argument("--image-guidance", type=float, default=options.IMAGE_GUIDANCE,
                   help="true image guidance s_i; > 1 turns true guidance on (3 passes per step); default "
                        f"{options.IMAGE_GUIDANCE}")
    s.add_argument("--text-guidance", type=float, default=options.TEXT_GUIDANCE,
                   help="true text guidance s_t; only acts when --image-guidance > 1 (as in the reference)")
    s.add_argument("--true-guidance-start", type=int, default=options.TRUE_GUIDANCE_START,
                   help=f"first step with true guidance (reference {options.TRUE_GUIDANCE_START})")
    s.add_argument("--batch-true-guidance", action="store_true",
                   help="run the 3 passes as one batch (faster, more memory)")
    s.add_argument("--height", type=int, default=options.PANEL, help=f"canvas height (default {options.PANEL})")
    s.add_argument("--width", type=int, default=2 * options.PANEL,
                   help=f"canvas width = two panels (default {2 * options.PANEL})")
    s.add_argument("--condition-sampling", choices=list(options.CONDITION_SAMPLING), default="sample",
                   help="; ".join(f"{k}: {v}" for k, v in options.CONDITION_SAMPLING.items()))
    s.add_argument("--fit", choices=list(options.FIT_MODES), default="center_crop",
                   help="how the reference fills its panel: " + "; ".join(f"{k}: {v}"
                                                                          for k, v in options.FIT_MODES.items()))
    s.add_argument("--resample", choices=options.RESAMPLE_FILTERS, default="bicubic", help="resize filter")
    e = p.add_argument_group("prompt enhancement (off by default)")
    e.add_argument("--enhance-prompt", choices=[b for b in options.ENHANCE_BACKENDS if b != "none"], default=None,
                   help="rewrite the prompt from the reference image first: gemini (key from GEMINI_API_KEY / "
                        "GOOGLE_API_KEY or DSD_GEMINI_KEY_FILE) or local (a vision-language model folder)")
    e.add_argument("--enhance-model", default=None,
                   help="Gemini model name (default: DSD_GEMINI_MODEL or the current default)")
    e.add_argument("--local-vlm", default=None,
                   help="folder of the local vision-language model (--enhance-prompt local)")
    o = p.add_argument_group("output")
    o.add_argument("--save-panel", action="store_true", help="also save the full canvas as OUT_panel.png")
    o.add_argument("--save-reference", action="store_true",
                   help="also save the model's reconstruction of the reference as OUT_reference.png")
    o.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only errors and the saved paths (same as -q before the command)")
    o.add_argument("--record-paths", action="store_true",
                   help="record the models' full local paths in the PNG (default: names and content fingerprints)")
    return p


# ---------------------------------------------------------------------------------------------- flags -> settings
def memory_config(args):
    """The MemoryConfig the flags describe: the preset (default: no savings) with the given switches changed."""
    from ..memory.config import MemoryConfig

    switches = {k: v for k, v in dict(offload=args.offload, transformer_weights=args.transformer_weights,
                                       text_encoder_weights=args.text_encoder_weights, gguf_file=args.gguf,
                                       fuse_lora=args.fuse_lora,
                                       release_text_encoders=args.release_text_encoders).items() if v is not None}
    return MemoryConfig.from_preset(args.memory or "full", **switches)


def speed_config(args):
    import dataclasses

    from ..speed import SpeedConfig

    base = SpeedConfig.from_name("fast" if args.fast else "exact")
    return dataclasses.replace(base, compile=args.compile, attention_backend=args.attention_backend)


def model_source(args):
    """The model source the flags describe: single files, or a base + DSD model folder / repo id."""
    from ..sources import FilesSource, FolderSource

    files = [args.transformer_file, args.clip_l, args.t5xxl, args.vae_file]
    if any(files):
        if not all(files):
            raise DSDError("single-file loading needs all of --transformer-file, --clip-l, --t5xxl and --vae-file.")
        return FilesSource(*files, lora=None if args.no_lora else args.lora, tokenizers=args.tokenizers)
    return FolderSource(base=args.base, model=args.model, transformer=args.transformer,
                        lora=False if args.no_lora else args.lora, local_files_only=args.offline)


# ---------------------------------------------------------------------------------------------- output
def output_paths(out: str, n: int, suffix: str = "") -> list[str]:
    stem, ext = os.path.splitext(out)
    ext = ext or ".png"
    return [f"{stem}{suffix}{ext}" if k == 0 else f"{stem}_{k}{suffix}{ext}" for k in range(n)]


def save_png(image, path: str, metadata: dict) -> None:
    """Write a PNG with a ``dsd`` text chunk (settings, seed, versions), atomically (temp file, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dsd", json.dumps(metadata, sort_keys=True))
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def model_records(args) -> dict:
    """The model flags as recorded in the PNG: names + fingerprints, not local paths (:mod:`dsd_core.provenance`)."""
    from ..provenance import model_record

    return {k: model_record(v, args.record_paths) for k, v in dict(
        base=args.base, model=args.model, transformer=args.transformer or args.transformer_file,
        lora=args.lora).items()}


def _quiet_progress() -> None:
    """No progress bars from the libraries that draw them (downloads, loading, checkpoint shards)."""
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    # 1. Flags -> typed settings, before anything heavy is loaded; numbers, paths, device and canvas memory checked
    from ..validation import check_generate_args

    check_generate_args(args)
    memory, speed, source = memory_config(args), speed_config(args), model_source(args)
    dtype = options.parse_dtype(args.dtype)
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if args.quiet:
        _quiet_progress()

    import diffusers
    import torch

    from .. import __version__
    from ..canvas import check_canvas_size
    from ..image import load_image, prepare_reference
    from ..loading import load_pipeline

    # 2. The reference, and the prompt (enhanced before loading DSD, so a local VLM never shares memory with it)
    check_canvas_size(args.height, args.width)
    reference = prepare_reference(load_image(args.image), args.height, args.width // 2, mode=args.fit,
                                  resample=args.resample)
    prompt = args.prompt
    if args.enhance_prompt:
        from ..prompt import enhance_prompt

        api_log = logging.getLogger("dsd_core.prompt.api")
        level, api_log.level = api_log.level, logging.ERROR  # the fallback is printed below, once
        try:
            result = enhance_prompt(reference, prompt, backend=args.enhance_prompt, model=args.enhance_model,
                                    local_model_path=args.local_vlm)
        finally:
            api_log.setLevel(level)
        if result.enhanced:
            print(f"enhanced prompt ({result.backend}{', cached' if result.cached else ''}): {result.prompt}")
            prompt = result.prompt
        else:
            print(f"prompt not enhanced: {result.warning}", file=sys.stderr)

    # 3. Load and generate
    t0 = time.perf_counter()
    pipe = load_pipeline(source=source, dtype=dtype, device=args.device, memory=memory, speed=speed)
    pipe.set_progress_bar_config(disable=args.quiet)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe(reference, prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
               guidance_scale=args.guidance, image_guidance_scale=args.image_guidance,
               text_guidance_scale=args.text_guidance, true_guidance_start_step=args.true_guidance_start,
               seed=args.seed, num_images_per_prompt=args.num_images, condition_sampling=args.condition_sampling,
               lora_scale=args.lora_scale, batch_true_guidance=args.batch_true_guidance)
    gen_s = time.perf_counter() - t0

    # 4. Save, with the settings in each PNG
    settings = {
        "prompt": out.prompt, "user_prompt": args.prompt, "enhance_prompt": args.enhance_prompt,
        "steps": args.steps, "guidance": args.guidance, "image_guidance": args.image_guidance,
        "text_guidance": args.text_guidance, "true_guidance_start": args.true_guidance_start,
        "height": args.height, "width": args.width, "condition_sampling": args.condition_sampling,
        "fit": args.fit, "resample": args.resample, "lora_scale": args.lora_scale, "no_lora": args.no_lora,
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""), **model_records(args),
        "memory": memory.describe(), "fast": args.fast, "compile": args.compile,
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
    if not args.quiet:
        print(f"loaded in {load_s:.1f} s, generated in {gen_s:.1f} s")
    return 0
