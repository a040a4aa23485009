"""``python -m dsd_core custom-diffusion train|merge|compress|generate|export-comfyui``.

* ``train``: every option of the engine (:class:`~dsd_core.training.config.TrainConfig`) and of the method
  (:class:`~.method.CustomDiffusionOptions`) as a flag or a key of a flat YAML file (``--config cd.yaml``; flags
  win). Custom Diffusion's defaults replace the engine's where they differ (:data:`CD_DEFAULTS`).
* ``merge A.safetensors B.safetensors ... --out M.safetensors``: the closed-form merge, features from the model the
  concepts were tuned on (``--mode``, ``--base``, ``--model`` / ``--from-flux``).
* ``compress IN --out OUT [--energy 0.6 | --rank R]``: SVD compression; prints file sizes, weight error and (with
  a model) the output change.
* ``generate``: generate with concept deltas applied (DSD: ``--image`` reference; FLUX: text only).
* ``export-comfyui DELTA --lora L.safetensors [--embeddings DIR]``: the deltas as a LoRA for ComfyUI's
  *LoraLoaderModelOnly* and each modifier token as a textual-inversion embedding (:mod:`.export`).
"""

from __future__ import annotations

import os

from ..errors import InputError

#: Where Custom Diffusion's recipe differs from the engine's defaults (CD: AdamW wd 1e-2, 500 steps on one GPU).
CD_DEFAULTS = {"max_steps": 500, "weight_decay": 1e-2, "checkpoint_every": 250, "validate_every": 0, "lr": 1e-4}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("custom-diffusion", help="Custom Diffusion: tune a concept, merge, compress, generate",
                              description="Custom Diffusion (Kumari et al. 2023) on FLUX.1-dev and DSD: few-image "
                                          "concept tuning, closed-form multi-concept merge, compressed deltas.")
    sub = p.add_subparsers(dest="cd_command", required=True)
    _add_train(sub)
    _add_model_args(_add_merge(sub))
    _add_model_args(_add_compress(sub))
    _add_model_args(_add_generate(sub))
    _add_export(sub)


def _add_train(sub) -> None:
    from ..training.config import TrainConfig, add_config_arguments
    from .options import CustomDiffusionOptions

    p = sub.add_parser("train", help="tune one or more concepts from a few images",
                       description="Tune a concept (a folder of 4-20 images) into a delta file. Options may come from "
                                   "a flat YAML file (--config); flags override it. CD's defaults: "
                                   + ", ".join(f"{k}={v}" for k, v in CD_DEFAULTS.items()))
    p.add_argument("--config", help="YAML file of option: value lines (keys are the flag names with _)")
    add_config_arguments(p, TrainConfig, title="engine options")
    add_config_arguments(p, CustomDiffusionOptions, title="Custom Diffusion options")


def _add_model_args(p) -> None:
    from ..loading import DEFAULT_BASE

    g = p.add_argument_group("model (the one the concepts were tuned on)")
    g.add_argument("--mode", choices=["dsd", "flux"], default="dsd", help="DSD model or plain FLUX.1-dev")
    g.add_argument("--base", default=DEFAULT_BASE, help="FLUX.1-dev diffusers folder or repo id")
    g.add_argument("--model", default=None, help="DSD model folder (mode dsd)")
    g.add_argument("--from-flux", default=None, help="FLUX transformer folder (mode flux; default BASE/transformer)")
    g.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cuda / cpu / mps")
    g.add_argument("--offline", action="store_true", help="never download")
    g.add_argument("--no-check-base", action="store_true", help="apply deltas even if made for another base model")


def _add_merge(sub):
    p = sub.add_parser("merge", help="merge separately tuned concepts in closed form")
    p.add_argument("deltas", nargs="+", help="concept delta files (.safetensors)")
    p.add_argument("--out", required=True, help="merged delta file")
    p.add_argument("--reg-prompts", help="text file of regularisation prompts, one per line (default: built-in 40)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge weight (x mean eigenvalue of C_reg^T C_reg)")
    p.add_argument("--sigmas", default="0.25,0.5,0.75,1.0", help="noise levels the features are collected at")
    p.add_argument("--size", type=int, default=256, help="latent size (pixels) of the feature-collection passes")
    p.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens per prompt while collecting")
    p.add_argument("--compress-energy", type=float, default=None, help="also compress the merged delta")
    return p


def _add_compress(sub):
    p = sub.add_parser("compress", help="SVD-compress a concept delta")
    p.add_argument("delta", help="concept delta file")
    p.add_argument("--out", required=True, help="compressed delta file")
    p.add_argument("--energy", type=float, default=0.6, help="singular-value fraction kept (CD: 0.6)")
    p.add_argument("--rank", type=int, default=None, help="a fixed rank instead of --energy")
    p.add_argument("--measure", action="store_true", help="load the model and report the output change")
    p.add_argument("--prompt", default=None, help="prompt of the output-change check (default: the concept's)")
    return p


def _add_generate(sub):
    p = sub.add_parser("generate", help="generate with concept deltas applied")
    p.add_argument("--concept", action="append", required=True, help="concept delta file (repeatable)")
    p.add_argument("--prompt", required=True, help="e.g. 'this <new1> cat wearing a hat'")
    p.add_argument("--image", help="reference image (mode dsd)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="panel / image side in pixels")
    p.add_argument("--scale", type=float, default=1.0, help="strength of the concept deltas")
    return p


def _add_export(sub):
    p = sub.add_parser("export-comfyui", help="write a concept delta as a ComfyUI LoRA (+ token embeddings)",
                       description="The concept's transformer deltas as a LoRA that ComfyUI's LoraLoaderModelOnly "
                                   "loads without unknown keys (text-rows deltas cannot be a LoRA and are left out, "
                                   "with a note), and with --embeddings each modifier token as an embedding file "
                                   "for ComfyUI's FLUX text encoders (prompt: 'photo of a embedding:new1 cat').")
    p.add_argument("delta", help="concept delta file")
    p.add_argument("--lora", required=True, help="LoRA file to write (e.g. ComfyUI/models/loras/cat.safetensors)")
    p.add_argument("--embeddings", default=None, help="folder for the token embeddings (e.g. ComfyUI/models/embeddings)")
    return p


def run(args) -> int:
    return {"train": run_train, "merge": run_merge, "compress": run_compress,
            "generate": run_generate, "export-comfyui": run_export}[args.cd_command](args)


# ---------------------------------------------------------------------------------------------- commands
def run_train(args) -> int:
    from ..training.config import TrainConfig, build_config, read_yaml
    from .method import CustomDiffusionOptions, train_concepts

    values = dict(CD_DEFAULTS)
    if args.config:
        values.update(read_yaml(args.config))
    names = {f for cls in (TrainConfig, CustomDiffusionOptions) for f in cls.__dataclass_fields__}
    values.update({k: v for k, v in vars(args).items() if k in names})
    config, options = build_config(values, TrainConfig, CustomDiffusionOptions, source=args.config or "the flags")
    result = train_concepts(config, options)
    if result.interrupted:
        print(f"interrupted at step {result.step}; continue with --resume latest")
        return 130
    print(f"trained {result.step} steps; concept delta: {os.path.join(config.output, options.delta_name)}")
    return 0


def load_model(args):
    """The pipeline ``args`` describe (DSD or plain FLUX), for merge / measure / generate."""
    from .method import load_model as load

    return load(args.mode, args.base, args.model, args.from_flux, args.dtype, args.device, args.offline or None)


def run_merge(args) -> int:
    from . import compress as cmp
    from .delta_file import ConceptFile
    from .merge import merge

    concepts = [ConceptFile.load(p) for p in args.deltas]
    prompts = None
    if args.reg_prompts:
        with open(args.reg_prompts, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise InputError(f"{args.reg_prompts} holds no prompts.")
    sigmas = tuple(float(s) for s in args.sigmas.split(",") if s.strip())
    pipe = load_model(args)
    result = merge(pipe, concepts, prompts, ridge=args.ridge, sigmas=sigmas, size=args.size,
                   max_sequence_length=args.max_sequence_length, check=not args.no_check_base)
    merged = result.concept
    if args.compress_energy:
        merged, _ = cmp.compress(merged, energy=args.compress_energy)
    merged.save(args.out)
    for path, mapping in zip(args.deltas, result.renames):
        if mapping:
            print(f"{os.path.basename(path)}: tokens renamed {mapping}")
    worst = max(result.constraint_error.values())
    print(f"merged {len(concepts)} concepts into {args.out} (tokens {', '.join(merged.token_names)}); max relative "
          f"error on the concepts' own token features: {worst:.2e}")
    return 0


def run_compress(args) -> int:
    from . import compress as cmp
    from .delta_file import ConceptFile

    concept = ConceptFile.load(args.delta)
    small, report = cmp.compress(concept, energy=None if args.rank else args.energy, rank=args.rank)
    small.save(args.out)
    change = None
    if args.measure:
        pipe = load_model(args)
        prompt = args.prompt or next((c.get("instance_prompt") for c in concept.info.get("concepts", [])
                                      if isinstance(c, dict)), None) or " ".join(concept.token_names)
        change = cmp.output_change(pipe, concept, small, prompt)
    print(cmp.format_report(report, os.path.getsize(args.delta), os.path.getsize(args.out), change))
    return 0


def run_generate(args) -> int:
    from ..commands.generate import save_png
    from .apply import concepts_applied
    from .delta_file import is_dsd

    pipe = load_model(args)
    with concepts_applied(pipe, args.concept, args.scale, check=not args.no_check_base) as applied:
        from .delta_file import check_prompt_tokens

        check_prompt_tokens(pipe, args.prompt)
        if is_dsd(pipe):
            if not args.image:
                raise InputError("mode dsd generates from a reference: pass --image.")
            from ..image import load_image, prepare_reference

            ref = prepare_reference(load_image(args.image), args.size, args.size)
            image = pipe(ref, args.prompt, height=args.size, width=2 * args.size, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, seed=args.seed).images[0]
        else:
            import torch

            image = pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        tokens = [t for a in applied for t in a.concept.token_names]
    save_png(image, args.out, {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "mode": args.mode,
                               "concepts": [os.path.basename(c) for c in args.concept], "tokens": tokens})
    print(f"saved {args.out}")
    return 0


def run_export(args) -> int:
    from .export import export_comfyui

    print(export_comfyui(args.delta, args.lora, args.embeddings).text())
    return 0


__all__ = ["add_parser", "run"]
