"""ComfyUI nodes of self-distillation data generation: one node per stage, so grids, panels and verdicts can be
looked at in the graph, plus one node that runs the whole resumable chain into a dataset folder.

Thin adapters over :mod:`dsd_core.datagen`; option lists and defaults come from its config.
"""

from __future__ import annotations

import json
import os

from . import _comfy

_CFG_HELP = None


def _help(name: str) -> str:
    global _CFG_HELP
    if _CFG_HELP is None:
        from dsd_core.datagen.config import config_help

        _CFG_HELP = config_help()
    return _CFG_HELP[name]


def _layout_input():
    from dsd_core.datagen.config import LAYOUTS

    return (list(LAYOUTS), {"default": "1x2", "tooltip": _help("layout")})


def _client(backend: str, gemini_model: str, local_model: str):
    from dsd_core.datagen.curation import check_client, make_client

    from .prompt_enhancer import _resolve_local_model

    client = make_client(backend, gemini_model, _resolve_local_model(local_model) if backend == "local" else None)
    check_client(backend, client)
    return client


def _close(client) -> None:
    if hasattr(client, "close"):
        client.close()


class DSDGridPrompts:
    DESCRIPTION = ("Turns seed captions (one a line) into grid prompts: the same subject in 2 or 4 panels, each with "
                   "its own scene, written by built-in templates (offline), Gemini (GEMINI_API_KEY) or a local model. "
                   "Deduplicated; the text output lists them.")
    CATEGORY = "DSD/datagen"
    FUNCTION = "make"
    RETURN_TYPES = ("DSD_GRID_PROMPTS", "STRING")
    RETURN_NAMES = ("grid_prompts", "text")

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.datagen.config import PROMPTERS

        return {"required": {
            "captions": ("STRING", {"multiline": True, "default": "a red ceramic teapot with a bamboo handle\n"
                                                                  "a plush toy dragon with golden wings",
                                    "tooltip": "Seed captions, one a line (e.g. LAION captions)."}),
            "layout": _layout_input(),
            "num": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": _help("num")}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": _help("seed")}),
            "prompter": (list(PROMPTERS), {"default": "template", "tooltip": _help("prompter")}),
            "gemini_model": ("STRING", {"default": "", "tooltip": _help("gemini_model")}),
            "local_model": ("STRING", {"default": "", "tooltip": "prompter local: model folder, or a folder name "
                                                                 "under models/LLM or models/."}),
        }}

    def make(self, captions, layout, num, seed, prompter, gemini_model, local_model):
        from dsd_core.datagen.config import get_layout
        from dsd_core.datagen.grid_prompts import make_grid_prompts, normalize
        from dsd_core.errors import InputError

        lines, seen = [], set()
        for line in captions.splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#") and normalize(line) not in seen:
                seen.add(normalize(line))
                lines.append(line)
        if not lines:
            raise InputError("no seed captions: write one caption a line.")
        client = _client(prompter, gemini_model, local_model) if prompter != "template" else None
        try:
            prompts = make_grid_prompts(lines, get_layout(layout), num or None, seed, writer=client,
                                        writer_name=prompter)
        finally:
            _close(client)
        text = "\n\n".join(f"[{p.id}] seed {p.seed} ({p.source}): {p.prompt}" for p in prompts)
        return {"ui": {"text": [text]}, "result": (prompts, text)}


class DSDFluxLoader:
    DESCRIPTION = ("Loads plain FLUX.1-dev (text to image, its own transformer) from models/diffusers/<name>/ to draw "
                   "the grids of data generation. Memory presets as for DSD (except gguf).")
    CATEGORY = "DSD/datagen"
    FUNCTION = "load"
    RETURN_TYPES = ("DSD_FLUX",)
    RETURN_NAMES = ("flux",)

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.model_store import DEFAULT_BASE_NAME, list_base_models

        from .loader import _choices, _config_inputs

        settings = _config_inputs()  # the DSD loaders' dtype and memory widgets (no speed modes for plain FLUX)
        return {"required": {
            "base": (_choices(DEFAULT_BASE_NAME, list_base_models(_comfy.folder_roots(_comfy.BASE_FOLDER))),
                     {"default": DEFAULT_BASE_NAME,
                      "tooltip": "FLUX.1-dev diffusers folder under models/diffusers, with its transformer/."}),
            "dtype": settings["dtype"],
            "memory": settings["memory"],
        }}

    def load(self, base, dtype, memory):
        from dsd_core.errors import ModelNotFoundError
        from dsd_core.loading import load_flux_pipeline
        from dsd_core.memory.config import MemoryConfig
        from dsd_core.model_store import find_folder
        from dsd_core.options import parse_dtype

        path = find_folder(base, _comfy.folder_roots(_comfy.BASE_FOLDER))
        if path is None:
            raise ModelNotFoundError(f"FLUX.1-dev folder {base} not found under models/diffusers; put a diffusers "
                                     "FLUX.1-dev folder (with transformer/) there.")
        device = _comfy.torch_device()
        _comfy.make_room(device)
        pipe = load_flux_pipeline(path, dtype=parse_dtype(dtype), device=device, memory=MemoryConfig.from_name(memory),
                                  local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return (pipe,)


class DSDGridGenerate:
    DESCRIPTION = ("Draws each grid prompt with plain FLUX at its layout's resolution (cols x rows panels), each grid "
                   "with its own seed (seed + index), in batches. Outputs the grids as one image batch.")
    CATEGORY = "DSD/datagen"
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grids",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "flux": ("DSD_FLUX",),
            "grid_prompts": ("DSD_GRID_PROMPTS",),
            "steps": ("INT", {"default": 28, "min": 1, "max": 200, "tooltip": _help("steps")}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": _help("guidance")}),
            "panel_size": ("INT", {"default": 512, "min": 16, "max": 2048, "step": 16, "tooltip": _help("panel_size")}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": _help("batch_size")}),
        }}

    def generate(self, flux, grid_prompts, steps, guidance, panel_size, batch_size):
        from dsd_core.datagen.config import DatagenConfig
        from dsd_core.datagen.grid_generation import batches, draw_grids
        from dsd_core.image import pil_to_tensor

        layouts = {p.layout for p in grid_prompts}
        if len(layouts) != 1:
            from dsd_core.errors import InputError

            raise InputError("the grid prompts mix layouts (or are empty); make them with one DSD Grid Prompts node.")
        cfg = DatagenConfig(layout=layouts.pop(), steps=steps, guidance=guidance, panel_size=panel_size,
                            batch_size=batch_size)
        groups = batches(len(grid_prompts), batch_size)
        bar = _comfy.progress_bar(len(groups) * steps)
        images = []
        for g, group in enumerate(groups):
            def on_step(step, total, g=g):
                _comfy.check_interrupt()
                if bar is not None:
                    bar.update_absolute(g * steps + step, len(groups) * steps)

            images += draw_grids(flux, [grid_prompts[i] for i in group], cfg, on_step)
        return (pil_to_tensor(images),)


class DSDPanelSplit:
    DESCRIPTION = ("Cuts grids into their panels (equal split by layout, borders and gutters detected and trimmed), "
                   "each resized to panel_size. Output: all panels, grid by grid, row by row.")
    CATEGORY = "DSD/datagen"
    FUNCTION = "split"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("panels",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "grids": ("IMAGE",),
            "layout": _layout_input(),
            "panel_size": ("INT", {"default": 512, "min": 16, "max": 2048, "step": 16, "tooltip": _help("panel_size")}),
            "trim": ("BOOLEAN", {"default": True, "tooltip": "Detect and trim borders and gutters (off: the plain "
                                                             "equal split)."}),
        }}

    def split(self, grids, layout, panel_size, trim):
        from dsd_core.datagen.config import get_layout
        from dsd_core.datagen.panel_split import SplitSettings, split_grid
        from dsd_core.image import pil_to_tensor, tensor_to_pil

        panels = []
        for grid in tensor_to_pil(grids):
            panels += split_grid(grid, get_layout(layout), panel_size, SplitSettings(trim=trim))
        return (pil_to_tensor(panels),)


class DSDCuratePairs:
    DESCRIPTION = ("Asks a vision-language model, step by step, whether each pair of panels of a grid shows the "
                   "identical subject (Gemini: GEMINI_API_KEY / GOOGLE_API_KEY in the environment; local: a model "
                   "folder; none: keep all). Outputs kept and rejected pairs side by side (a dark placeholder when "
                   "there are none) and the verdicts with their reasons as text.")
    CATEGORY = "DSD/datagen"
    FUNCTION = "curate"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("kept_pairs", "rejected_pairs", "verdicts")

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.datagen.config import CURATORS, ON_MALFORMED

        return {"required": {
            "panels": ("IMAGE",),
            "layout": _layout_input(),
            "curator": (list(CURATORS), {"default": "gemini", "tooltip": _help("curator")}),
            "min_confidence": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "tooltip": _help("min_confidence")}),
            "on_malformed": (list(ON_MALFORMED), {"default": "reject", "tooltip": _help("on_malformed")}),
            "gemini_model": ("STRING", {"default": "", "tooltip": _help("gemini_model")}),
            "local_model": ("STRING", {"default": "", "tooltip": "curator local: model folder, or a folder name "
                                                                 "under models/LLM or models/."}),
        }, "optional": {
            "instructions": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Replace the curation instructions (empty: the default)."}),
        }}

    def curate(self, panels, layout, curator, min_confidence, on_malformed, gemini_model, local_model,
               instructions=""):
        import PIL.Image

        from dsd_core.datagen.config import get_layout
        from dsd_core.datagen.curation import Curator
        from dsd_core.datagen.panel_split import ordered_pairs
        from dsd_core.errors import InputError
        from dsd_core.image import pil_to_tensor, tensor_to_pil

        n = get_layout(layout).panels
        images = tensor_to_pil(panels)
        if len(images) % n:
            raise InputError(f"{len(images)} panels is not a whole number of {layout} grids ({n} panels each).")
        client = _client(curator, gemini_model, local_model) if curator != "none" else None
        judge = Curator(client, instructions or None, min_confidence, on_malformed)
        kept, rejected, verdicts = [], [], []
        bar = _comfy.progress_bar(len(images) // n)
        try:
            for g in range(len(images) // n):
                grid = images[g * n:(g + 1) * n]
                answers = {}
                for i, j in ordered_pairs(n):
                    _comfy.check_interrupt()
                    if i < j:
                        answers[(i, j)] = judge.judge(grid[i], grid[j])
                    verdict, reason = answers[(min(i, j), max(i, j))]
                    pair = PIL.Image.new("RGB", (grid[i].width + grid[j].width, grid[i].height))
                    pair.paste(grid[i], (0, 0))
                    pair.paste(grid[j], (grid[i].width, 0))
                    (kept if reason is None else rejected).append(pair)
                    verdicts.append({"grid": g, "reference": i, "target": j, "kept": reason is None,
                                     "reason": reason, "subject": verdict.subject, "confidence": verdict.confidence,
                                     "reasoning": verdict.reasoning, "problem": verdict.problem})
                if bar is not None:
                    bar.update(1)
        finally:
            _close(client)
        placeholder = PIL.Image.new("RGB", (2 * images[0].width, images[0].height), (24, 24, 24))
        text = json.dumps(verdicts, indent=1)
        return {"ui": {"text": [text]},
                "result": (pil_to_tensor(kept or [placeholder]), pil_to_tensor(rejected or [placeholder]), text)}


class DSDDataGen:
    DESCRIPTION = ("Runs the whole self-distillation data generation into a dataset folder (metadata.jsonl + panels, "
                   "the trainer's format) under ComfyUI's output folder: grid prompts, FLUX grids, panel split, "
                   "curation, captions, summary and contact sheet. Resumable: queue it again with the same settings "
                   "to continue where it stopped. For many GPUs use `accelerate launch -m dsd_core datagen`.")
    CATEGORY = "DSD/datagen"
    FUNCTION = "run"
    RETURN_TYPES = ("STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("summary", "contact_sheet", "dataset_folder")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.datagen.config import CURATORS, PROMPTERS

        return {"required": {
            "flux": ("DSD_FLUX",),
            "captions": ("STRING", {"multiline": True, "default": "a red ceramic teapot with a bamboo handle",
                                    "tooltip": "Seed captions, one a line."}),
            "output_folder": ("STRING", {"default": "dsd_datagen", "tooltip": "Folder under ComfyUI's output "
                                                                             "folder (or an absolute path)."}),
            "layout": _layout_input(),
            "num": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": _help("num")}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": _help("seed")}),
            "prompter": (list(PROMPTERS), {"default": "template", "tooltip": _help("prompter")}),
            "curator": (list(CURATORS), {"default": "gemini", "tooltip": _help("curator")}),
            "steps": ("INT", {"default": 28, "min": 1, "max": 200, "tooltip": _help("steps")}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": _help("guidance")}),
            "panel_size": ("INT", {"default": 512, "min": 16, "max": 2048, "step": 16, "tooltip": _help("panel_size")}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": _help("batch_size")}),
            "min_confidence": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "tooltip": _help("min_confidence")}),
            "instruction_captions": ("BOOLEAN", {"default": False, "tooltip": _help("instruction_captions")}),
        }, "optional": {
            "gemini_model": ("STRING", {"default": "", "tooltip": _help("gemini_model")}),
            "local_model": ("STRING", {"default": "", "tooltip": _help("local_vlm")}),
        }}

    def run(self, flux, captions, output_folder, layout, num, seed, prompter, curator, steps, guidance, panel_size,
            batch_size, min_confidence, instruction_captions, gemini_model="", local_model=""):
        import PIL.Image

        from dsd_core.datagen import DatagenConfig, Hooks, run_datagen
        from dsd_core.datagen.manifest import atomic_write_text
        from dsd_core.datagen.output import format_summary
        from dsd_core.image import pil_to_tensor

        from .prompt_enhancer import _resolve_local_model

        out = output_folder if os.path.isabs(output_folder) else os.path.join(_output_dir(), output_folder)
        captions_file = os.path.join(out, "captions.txt")
        atomic_write_text(captions_file, captions.strip() + "\n")
        cfg = DatagenConfig(captions=captions_file, out=out, layout=layout, num=num, seed=seed, prompter=prompter,
                            curator=curator, steps=steps, guidance=guidance, panel_size=panel_size,
                            batch_size=batch_size, min_confidence=min_confidence,
                            instruction_captions=instruction_captions, gemini_model=gemini_model,
                            local_vlm=_resolve_local_model(local_model) or "")
        bars: dict = {}

        def progress(stage, done, total):
            bar = bars.get(stage) or bars.setdefault(stage, _comfy.progress_bar(total))
            if bar is not None:
                bar.update_absolute(done, total)

        summary = run_datagen(cfg, pipe=flux, hooks=Hooks(progress=progress, check_interrupt=_comfy.check_interrupt))
        text = format_summary(summary)
        with PIL.Image.open(os.path.join(out, "contact_sheet.png")) as sheet:
            image = pil_to_tensor(sheet.convert("RGB"))
        return {"ui": {"text": [text]}, "result": (text, image, out)}


def _output_dir() -> str:
    try:
        import folder_paths

        return folder_paths.get_output_directory()
    except ImportError:
        return os.path.abspath("output")


NODE_CLASS_MAPPINGS = {"DSDGridPrompts": DSDGridPrompts, "DSDFluxLoader": DSDFluxLoader,
                       "DSDGridGenerate": DSDGridGenerate, "DSDPanelSplit": DSDPanelSplit,
                       "DSDCuratePairs": DSDCuratePairs, "DSDDataGen": DSDDataGen}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDGridPrompts": "DSD Grid Prompts", "DSDFluxLoader": "DSD FLUX Loader (data generation)",
                              "DSDGridGenerate": "DSD Grid Generate", "DSDPanelSplit": "DSD Panel Split",
                              "DSDCuratePairs": "DSD Curate Pairs", "DSDDataGen": "DSD Data Generation (to folder)"}
