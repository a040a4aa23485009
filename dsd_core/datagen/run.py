"""The whole chain, resumable and shardable: seed captions -> grid prompts -> grids -> panels -> curated, captioned
pairs -> dataset. See :mod:`dsd_core.datagen` for the overview and :mod:`.manifest` for the folder layout.

Under ``accelerate launch`` every process runs :func:`run_datagen`: the main process writes the prompts, each process
takes every ``num_processes``-th fixed batch of grids (:func:`.grid_generation.shard`), and the main process
assembles the dataset once all are done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import PIL.Image

from .captions import Captioner
from .config import DatagenConfig
from .curation import Curator, check_client, make_client
from .grid_generation import batches, draw_grids, load_grid_pipeline, shard
from .grid_prompts import GridPrompt, make_grid_prompts, read_captions
from .manifest import Manifest, atomic_save_image, check_run_settings, stage_reached
from .output import write_jsonl, write_outputs
from .panel_split import ordered_pairs, split_grid

logger = logging.getLogger(__name__)


@dataclass
class Hooks:
    """Callbacks of a run (all optional).

    progress(stage, done, total): after each grid of a stage ("prompts", "grid", "panels", "curated",
    "captioned"); check_interrupt(): between grids and denoising steps, may raise to stop; after_stage(stage, id):
    after a grid's stage is saved; step(step, total): after each denoising step.
    """

    progress: Callable | None = None
    check_interrupt: Callable | None = None
    after_stage: Callable | None = None
    step: Callable | None = None

    def _call(self, name, *args):
        fn = getattr(self, name)
        if fn is not None:
            fn(*args)


def _process_state(device: str | None = None):
    """accelerate's process state (a single process when not launched by accelerate). Without CUDA (or with device
    cpu) the processes talk over gloo on the CPU (accelerate's MULTI_CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def plan_prompts(cfg: DatagenConfig, writer=None, progress=None) -> list[GridPrompt]:
    """The grid prompts of ``cfg`` (``writer``: the LLM client for prompter gemini/local)."""
    captions = read_captions(cfg.captions)
    return make_grid_prompts(captions, cfg.grid_layout, cfg.num or None, cfg.seed, writer=writer,
                             writer_name=cfg.prompter, progress=progress)


def load_prompts(path: str) -> list[GridPrompt]:
    with open(path, encoding="utf-8") as f:
        return [GridPrompt.from_json(json.loads(line)) for line in f if line.strip()]


def run_datagen(cfg: DatagenConfig, pipe=None, hooks: Hooks | None = None, state=None) -> dict | None:
    """Run (or resume) ``cfg`` into ``cfg.out``; returns the summary on the main process, None on the others.

    ``pipe``: an already loaded plain FLUX pipeline (else :func:`.grid_generation.load_grid_pipeline` loads one when a
    grid is still to be drawn, and frees it before curation). ``state``: accelerate's process state (default: the
    current one).
    """
    from ..errors import InputError

    hooks = hooks or Hooks()
    if not cfg.out:
        raise InputError("no output folder given; pass --out DIR.")
    if not cfg.captions:
        raise InputError("no captions file given; pass --captions FILE (one seed caption a line).")
    state = state or _process_state(cfg.device)
    if state.num_processes > 1 and not cfg.device:
        cfg = dataclasses.replace(cfg, device=str(state.device))
    prompter = make_client(cfg.prompter, cfg.gemini_model, cfg.local_vlm, cfg.timeout, cfg.retries)
    curator_client = make_client(cfg.curator, cfg.gemini_model, cfg.local_vlm, cfg.timeout, cfg.retries)
    caption_client = curator_client if cfg.caption_backend == cfg.curator else make_client(
        cfg.caption_backend, cfg.gemini_model, cfg.local_vlm, cfg.timeout, cfg.retries)
    for backend, client in ((cfg.prompter, prompter), (cfg.curator, curator_client),
                            (cfg.caption_backend, caption_client)):
        check_client(backend, client)
    try:
        return _run(cfg, pipe, hooks, state, prompter, curator_client, caption_client)
    finally:
        for client in (prompter, curator_client, caption_client):
            if hasattr(client, "close"):
                client.close()
        if "local" in (cfg.curator, cfg.caption_backend, cfg.prompter):
            from ..prompt import unload_local_models

            unload_local_models()


def _run(cfg: DatagenConfig, pipe, hooks: Hooks, state, prompter, curator_client, caption_client) -> dict | None:
    rank, world = state.process_index, state.num_processes
    out = os.path.abspath(cfg.out)
    manifest = Manifest(out)

    # 1. grid prompts: written once, by the main process
    prompts_path = os.path.join(out, "prompts.jsonl")
    if state.is_main_process:
        os.makedirs(out, exist_ok=True)
        check_run_settings(out, cfg.fingerprint())
        if not os.path.isfile(prompts_path):
            progress = (lambda d, t: hooks._call("progress", "prompts", d, t))
            write_jsonl(prompts_path, [p.to_json() for p in plan_prompts(cfg, prompter, progress)])
    state.wait_for_everyone()
    prompts = load_prompts(prompts_path)
    groups = shard(batches(len(prompts), cfg.batch_size), rank, world)
    mine = [i for g in groups for i in g]
    logger.info("process %d of %d: %d of %d grids", rank, world, len(mine), len(prompts))

    # 2. grids, in fixed batches (a batch with any grid missing is drawn again; drawn grids are kept as they are)
    todo = [g for g in groups if any(not stage_reached(manifest.load(prompts[i].id), "grid") for i in g)]
    own_pipe = pipe is None and bool(todo)
    if own_pipe:
        pipe = load_grid_pipeline(cfg)
    if todo and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    done = len(mine) - sum(len(g) for g in todo)

    def on_step(step, total):
        hooks._call("check_interrupt")
        hooks._call("step", step, total)

    drawn = []  # grids this process saved (a batch is redrawn whole, but only its missing grids are saved)
    for group in todo:
        hooks._call("check_interrupt")
        images = draw_grids(pipe, [prompts[i] for i in group], cfg, on_step)
        for i, image in zip(group, images):
            p = prompts[i]
            if not stage_reached(manifest.load(p.id), "grid"):
                path = os.path.join(out, "grids", f"{p.id}.png")
                atomic_save_image(image, path)
                manifest.save({"id": p.id, "stage": "grid", "prompt": p.to_json(), "grid": manifest.rel(path)})
                drawn.append(p.id)
                hooks._call("after_stage", "grid", p.id)
            done += 1
            hooks._call("progress", "grid", done, len(mine))
    pipe = None  # ours is freed here (before a local VLM may load); a caller's stays loaded
    if own_pipe:
        from ..prompt.local import _empty_cuda_cache

        gc.collect()
        _empty_cuda_cache()

    # 3-5. panels, curation, captions, grid by grid
    curator = Curator(curator_client, cfg.instructions_text(), cfg.min_confidence, cfg.on_malformed,
                      cfg.malformed_retries)
    captioner = Captioner(caption_client, cfg.instruction_captions, cfg.caption_backend)
    for n, i in enumerate(mine):
        hooks._call("check_interrupt")
        finish_item(manifest, prompts[i], cfg, curator, captioner, hooks)
        hooks._call("progress", "captioned", n + 1, len(mine))

    # which process did what (appended per run: a resumed run adds a line)
    log = os.path.join(out, "processes", f"{rank}.jsonl")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"process": rank, "num_processes": world, "grids": [prompts[i].id for i in mine],
                            "drawn": drawn}) + "\n")

    # 6. the dataset, once every process is done
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_outputs(manifest, [p.id for p in prompts], cfg.contact_sheet_pairs)


def _open(manifest: Manifest, rel: str) -> PIL.Image.Image:
    with PIL.Image.open(manifest.abs(rel)) as im:
        return im.convert("RGB")


def finish_item(manifest: Manifest, prompt: GridPrompt, cfg: DatagenConfig, curator: Curator, captioner: Captioner,
                hooks: Hooks | None = None) -> dict:
    """Take one drawn grid through its remaining stages (panels, curated, captioned); returns its record.

    A curator error leaves the grid at its last complete stage (the next run asks again).
    """
    hooks = hooks or Hooks()
    record = manifest.load(prompt.id)
    if not stage_reached(record, "grid"):
        raise RuntimeError(f"grid {prompt.id} has not been drawn")
    layout = cfg.grid_layout
    if not stage_reached(record, "panels"):
        panels = split_grid(_open(manifest, record["grid"]), layout, cfg.panel_size)
        paths = []
        for k, panel in enumerate(panels):
            path = os.path.join(manifest.out, "panels", f"{prompt.id}_{k}.png")
            atomic_save_image(panel, path)
            paths.append(manifest.rel(path))
        record = dict(record, stage="panels", panels=paths)
        manifest.save(record)
        hooks._call("after_stage", "panels", prompt.id)
    images = None
    if not stage_reached(record, "curated"):
        images = [_open(manifest, p) for p in record["panels"]]
        verdicts = {}
        for i, j in ordered_pairs(len(images)):
            if i < j:
                verdict, reason = curator.judge(images[i], images[j])
                if reason == "curator_error":
                    logger.warning("grid %s: curation failed (%s); it is retried by the next run", prompt.id,
                                   verdict.problem)
                    return record
                verdicts[(i, j)] = (verdict.to_json(), reason)
        pairs = []
        for i, j in ordered_pairs(len(images)):
            verdict, reason = verdicts[(min(i, j), max(i, j))]
            pairs.append({"reference": i, "target": j, "reason": reason, "verdict": verdict})
        record = dict(record, stage="curated", pairs=pairs)
        manifest.save(record)
        hooks._call("after_stage", "curated", prompt.id)
    if not stage_reached(record, "captioned"):
        images = images or [_open(manifest, p) for p in record["panels"]]
        kept = [p for p in record["pairs"] if p["reason"] is None]
        captions = {}
        for target in sorted({p["target"] for p in kept}):
            caption, source = captioner.target_caption(prompt, target, images[target])
            captions[str(target)] = {"caption": caption, "source": source}
        pairs = []
        for pair in record["pairs"]:
            if pair["reason"] is None and captioner.instructions:
                pair = dict(pair, instruction=captioner.instruction(prompt, pair["reference"], pair["target"],
                                                                    images[pair["reference"]],
                                                                    images[pair["target"]]))
            pairs.append(pair)
        record = dict(record, stage="captioned", captions=captions, pairs=pairs)
        manifest.save(record)
        hooks._call("after_stage", "captioned", prompt.id)
    return record
