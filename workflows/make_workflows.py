"""The one source of the shipped workflows: writes each graph in ComfyUI's UI format and in the API format.

    python workflows/make_workflows.py          # rewrite the generated files
    python workflows/make_workflows.py --check  # exit 1 if a committed file differs (tests run this)

For each graph ``<name>`` in ``GRAPHS``:

* ``workflows/<name>.json`` - the UI workflow users drag onto ComfyUI (nodes with widget values, links, notes on the
  canvas explaining the knobs). ComfyUI lists every ``custom_nodes/<pack>/workflows/*.json`` in its Templates browser,
  so only UI workflows live at this level;
* ``workflows/<name>.jpg`` - its thumbnail in the Templates browser (the frontend asks for ``<name>.jpg``), drawn
  from the graph itself by ``render_thumbnail`` (node boxes with titles, links, notes), so every graph gets one;
* ``workflows/api/<name>.json`` - the API workflow headless clients POST to ``/prompt`` (not listed by the browser).

All three come from the same ``Graph``, so they cannot drift; any other ``.json``/``.jpg`` in ``workflows/`` is
removed (``--check`` reports it). The graphs name the standard model folders ``models/dsd/dsd_model`` and
``models/diffusers/FLUX.1-dev`` and the input image ``dsd_reference.png``. Notes sit in a row above the nodes, inside
the first view (``FIRST_VIEW``); tests/test_workflows.py checks nothing overlaps.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
API_DIR = "api"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from dsd_core import options as o  # noqa: E402  (the defaults the nodes and the CLI use; a light module)

REFERENCE_IMAGE = "dsd_reference.png"
#: LiteGraph draws a node's title bar above its ``pos``; a Note is a node too.
TITLE_HEIGHT = 30
#: the screen area (CSS px) a workflow must show its notes in when it opens, with or without ``extra.ds`` applied
FIRST_VIEW = (1280, 720)
VIEW = {"scale": 0.8, "offset": [0, 0]}
THUMBNAIL_SIZE = 512


@dataclass
class Node:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)  # widget name -> value, in INPUT_TYPES order
    inputs: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    pos: tuple = (0, 0)
    size: tuple = (320, 160)
    title: str | None = None


# The node interfaces the UI format needs: link inputs (name, type) and outputs (name, type), in order.
# tests/test_workflows.py checks these against the real INPUT_TYPES / RETURN_TYPES.
INTERFACES = {
    "LoadImage": dict(links=[], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], extra_widgets={"upload": "image"}),
    "SaveImage": dict(links=[("images", "IMAGE")], outputs=[]),
    "PreviewImage": dict(links=[("images", "IMAGE")], outputs=[]),
    "DSDModelLoader": dict(links=[], outputs=[("dsd_model", "DSD_MODEL")]),
    "DSDFilesLoader": dict(links=[], outputs=[("dsd_model", "DSD_MODEL")]),
    "DSDImagePrep": dict(links=[("image", "IMAGE")], outputs=[("image", "IMAGE")]),
    "DSDSampler": dict(links=[("dsd_model", "DSD_MODEL"), ("image", "IMAGE")],
                       outputs=[("images", "IMAGE"), ("reference_reconstruction", "IMAGE"),
                                ("prompt_used", "STRING"), ("notes", "STRING")]),
    "DSDPromptEnhancer": dict(links=[("image", "IMAGE")], outputs=[("prompt", "STRING"), ("caption", "STRING")]),
    # --- native path: ComfyUI's own loaders and custom sampling + the DSD native nodes
    "UNETLoader": dict(links=[], outputs=[("MODEL", "MODEL")]),
    "DualCLIPLoader": dict(links=[], outputs=[("CLIP", "CLIP")]),
    "VAELoader": dict(links=[], outputs=[("VAE", "VAE")]),
    "LoraLoaderModelOnly": dict(links=[("model", "MODEL")], outputs=[("MODEL", "MODEL")]),
    "RandomNoise": dict(links=[], outputs=[("NOISE", "NOISE")]),
    "KSamplerSelect": dict(links=[], outputs=[("SAMPLER", "SAMPLER")]),
    "SamplerCustomAdvanced": dict(links=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                         ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                                  outputs=[("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": dict(links=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")]),
    "DSDApplyNative": dict(links=[("model", "MODEL")], outputs=[("model", "MODEL")]),
    "DSDTextEncode": dict(links=[("clip", "CLIP")], outputs=[("conditioning", "CONDITIONING"),
                                                             ("prompt_used", "STRING")]),
    "DSDNativeConditioning": dict(links=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                         ("vae", "VAE"), ("image", "IMAGE")],
                                  outputs=[("positive", "CONDITIONING"), ("image_only", "CONDITIONING"),
                                           ("unconditional", "CONDITIONING"), ("latent", "LATENT")]),
    "DSDGuider": dict(links=[("model", "MODEL"), ("positive", "CONDITIONING"), ("image_only", "CONDITIONING"),
                             ("unconditional", "CONDITIONING")], outputs=[("GUIDER", "GUIDER")]),
    "DSDScheduler": dict(links=[], outputs=[("SIGMAS", "SIGMAS")]),
    "DSDSplitCanvas": dict(links=[("canvas", "IMAGE")], outputs=[("images", "IMAGE"),
                                                                 ("reference_reconstruction", "IMAGE")]),
    # data generation (dsd_core.datagen)
    "DSDGridPrompts": dict(links=[], outputs=[("grid_prompts", "DSD_GRID_PROMPTS"), ("text", "STRING")]),
    "DSDFluxLoader": dict(links=[], outputs=[("flux", "DSD_FLUX")]),
    "DSDGridGenerate": dict(links=[("flux", "DSD_FLUX"), ("grid_prompts", "DSD_GRID_PROMPTS")],
                            outputs=[("grids", "IMAGE")]),
    "DSDPanelSplit": dict(links=[("grids", "IMAGE")], outputs=[("panels", "IMAGE")]),
    "DSDCuratePairs": dict(links=[("panels", "IMAGE")], outputs=[("kept_pairs", "IMAGE"), ("rejected_pairs", "IMAGE"),
                                                                  ("verdicts", "STRING")]),
    "DSDConceptLoader": dict(links=[], outputs=[("concept", "DSD_CONCEPT")]),
    "DSDApplyConcept": dict(links=[("dsd_model", "DSD_MODEL"), ("concept", "DSD_CONCEPT")],
                            outputs=[("dsd_model", "DSD_MODEL"), ("words", "STRING")]),
    # distillation (nodes/distill.py)
    "DSDTeacherPairs": dict(links=[("dsd_model", "DSD_MODEL"), ("images", "IMAGE")], outputs=[("dataset", "STRING")]),
    "DSDBuildStudent": dict(links=[("dsd_model", "DSD_MODEL")], outputs=[("student", "STRING"), ("info", "STRING")]),
    "DSDDistillStudent": dict(links=[("dsd_model", "DSD_MODEL"), ("student", "STRING"), ("dataset", "STRING")],
                              outputs=[("dsd_model", "DSD_MODEL"), ("model_folder", "STRING"),
                                       ("loss_curve", "IMAGE")]),
    "DSDCompareStudent": dict(links=[("dsd_model", "DSD_MODEL"), ("student", "STRING"), ("dataset", "STRING")],
                              outputs=[("grid", "IMAGE"), ("report", "STRING")]),
}
#: Widgets whose UI value is followed by the "control after generate" value.
CONTROL_AFTER_GENERATE = {("DSDSampler", "seed"): "fixed", ("RandomNoise", "noise_seed"): "fixed",
                          ("DSDGridPrompts", "seed"): "fixed",
                          ("DSDTeacherPairs", "seed"): "fixed", ("DSDCompareStudent", "seed"): "fixed"}


def loader(id, pos):
    return Node(id, "DSDModelLoader", dict(model="dsd_model", base="FLUX.1-dev", dtype="auto", memory="full",
                                           speed="exact", download_missing=False), pos=pos, size=(340, 200))


def sampler(id, pos, model, image, prompt="this character playing soccer", seed=0, image_guidance=o.IMAGE_GUIDANCE,
            text_guidance=o.TEXT_GUIDANCE, extra_inputs=None):
    widgets = dict(prompt=prompt, seed=seed, steps=o.STEPS, guidance=o.GUIDANCE, image_guidance=image_guidance,
                   text_guidance=text_guidance, panel_size=o.PANEL, batch_size=1, lora_scale=o.LORA_SCALE,
                   condition_sampling="sample", fit="center_crop")
    inputs = {"dsd_model": (model, 0), "image": (image, 0), **(extra_inputs or {})}
    return Node(id, "DSDSampler", widgets, inputs, pos=pos, size=(380, 460))


#: Note text metrics (ComfyUI's Note textarea, conservatively): character width and line height in canvas px.
NOTE_CHAR_W, NOTE_LINE_H, NOTE_PAD = 8, 20, 40


def note_lines(text: str, width: int) -> int:
    """How many lines ``text`` wraps to in a Note ``width`` px wide (word wrap, conservative metrics)."""
    per_line = max(1, (width - NOTE_PAD) // NOTE_CHAR_W)
    lines = 0
    for para in text.split("\n"):
        n, col = 1, 0
        for word in para.split():
            if col == 0:
                col = len(word)
            elif col + 1 + len(word) <= per_line:
                col += 1 + len(word)
            else:
                n, col = n + 1, len(word)
            while col > per_line:  # a word longer than the line breaks anywhere
                n, col = n + 1, col - per_line
        lines += n
    return lines


def notes_row(*notes: tuple[int, str], top: int = 40, left: int = 40, gap: int = 40) -> list[tuple]:
    """Notes ``(width, text)`` side by side from (left, top), each tall enough for its text: [(pos, size, text)]."""
    out, x = [], left
    for width, text in notes:
        out.append(((x, top), (width, note_lines(text, width) * NOTE_LINE_H + NOTE_PAD), text))
        x += width + gap
    return out


def below(notes: list[tuple], gap: int = 40) -> int:
    """The ``pos`` y of a node row whose title bars start ``gap`` px under the notes."""
    return max(pos[1] + size[1] for pos, size, _ in notes) + gap + TITLE_HEIGHT


def basic() -> tuple[list[Node], list[tuple]]:
    notes = notes_row(
        (560, "DSD basic generation\n\n"
              "1. Put primecai/dsd_model into models/dsd/dsd_model (transformer/ + pytorch_lora_weights.safetensors) "
              "and a diffusers FLUX.1-dev folder into models/diffusers/FLUX.1-dev, or switch download_missing on.\n"
              "2. Load your reference image (any size; it is center-cropped to a square).\n"
              "3. Describe what the subject should do: 'this character playing soccer', 'this logo on a T-shirt'.\n\n"
              "Defaults are the official DSD settings: 28 steps, guidance 3.5, 512 px panels."),
        (440, "Knobs\n\nguidance: FLUX distilled guidance (3.5). Raise it if the subject drifts.\n"
              "seed: same seed, same image. batch_size: seeds seed, seed+1, ...\n"
              "panel_size: 512 is what DSD was trained at; above 768 it distorts.\n"
              "For stronger identity, see the true-guidance workflow."),
    )
    y = below(notes)
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, y + 260), size=(320, 320)),
        loader(2, (40, y)),
        sampler(3, (420, y), model=2, image=1),
        Node(4, "SaveImage", dict(filename_prefix="dsd_basic"), {"images": (3, 0)}, pos=(840, y), size=(400, 440)),
        Node(5, "PreviewImage", {}, {"images": (3, 1)}, pos=(840, y + 500), size=(300, 300),
             title="Reference reconstruction"),
    ]
    return nodes, notes


def true_guidance() -> tuple[list[Node], list[tuple]]:
    notes = notes_row(
        (760, "DSD with true guidance\n\n"
              "image_guidance > 1 adds two extra passes per step (from step 2): one with an empty prompt and the "
              "reference, one with neither. The result follows the reference's identity more closely; it takes ~3x "
              "longer.\n"
              "image_guidance 1.5 / text_guidance 1.0 are the official demo's defaults. text_guidance only acts when "
              "image_guidance > 1; raise it to follow the prompt more.\n\n"
              "DSD Image Prep: center_crop is the official preprocessing; pad keeps the whole picture (product "
              "shots)."),
    )
    y = below(notes)
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, y + 260), size=(320, 320)),
        loader(2, (40, y)),
        Node(6, "DSDImagePrep", dict(fit="center_crop", resample="bicubic", panel_size=o.PANEL, pad_color="white"),
             {"image": (1, 0)}, pos=(420, y + 260), size=(320, 170)),
        sampler(3, (780, y), model=2, image=6, prompt="this character surfing a big wave, golden hour",
                seed=42, image_guidance=1.5, text_guidance=1.0),
        Node(4, "SaveImage", dict(filename_prefix="dsd_true_guidance"), {"images": (3, 0)}, pos=(1200, y),
             size=(400, 440)),
    ]
    return nodes, notes


def comfy_files() -> tuple[list[Node], list[tuple]]:
    notes = notes_row(
        (760, "DSD from the files you already have (nothing downloaded)\n\n"
              "models/text_encoders: clip_l.safetensors and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn); "
              "models/vae: ae.safetensors - the same files FLUX workflows use.\n"
              "models/diffusion_models/dsd_transformer.safetensors: primecai/dsd_model's "
              "transformer/diffusion_pytorch_model.safetensors, renamed (bf16, fp8 and the original FLUX key layout "
              "work too).\nmodels/loras/dsd_lora.safetensors: its pytorch_lora_weights.safetensors, renamed.\n"
              "The tokenizers come from ComfyUI itself."),
    )
    y = below(notes)
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, y + 290), size=(320, 320)),
        Node(2, "DSDFilesLoader", dict(transformer="dsd_transformer.safetensors", lora="dsd_lora.safetensors",
                                       clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
                                       vae="ae.safetensors", dtype="auto", memory="full", speed="exact"),
             pos=(40, y), size=(340, 230)),
        sampler(3, (420, y), model=2, image=1, prompt="this character reading a book in a cozy library", seed=7),
        Node(4, "SaveImage", dict(filename_prefix="dsd_comfy_files"), {"images": (3, 0)}, pos=(840, y),
             size=(400, 440)),
    ]
    return nodes, notes


# ---- training (nodes/training.py) ----
INTERFACES.update({
    "DSDTrainingDataset": dict(links=[], outputs=[("dataset", "DSD_TRAINING_DATA")]),
    "DSDTrainLoRA": dict(links=[("dataset", "DSD_TRAINING_DATA")],
                         outputs=[("dsd_model", "DSD_MODEL"), ("loss", "LOSS_MAP"), ("model_folder", "STRING"),
                                  ("steps", "INT")]),
    "DSDPlotLoss": dict(links=[("loss", "LOSS_MAP")], outputs=[("plot", "IMAGE")]),
})
TRAINING_DATA = "dsd_pairs"


def training() -> tuple[list[Node], list[tuple]]:
    train = dict(base="FLUX.1-dev", start_from="FLUX (fresh c_embedder + LoRA)", output_name="my_dsd", steps=1000,
                 learning_rate=1e-4, batch_size=1, gradient_accumulation=4, rank=32, alpha=32.0,
                 lora_targets="attention", panel_size=512, base_weights="fp8", run_seed=0, resume=True,
                 checkpoint_every=250, validate_every=250, validation_steps=28, optimizer="adamw",
                 lr_scheduler="constant", gradient_checkpointing=True, condition_dropout=0.1, caption_dropout=0.1,
                 dtype="auto")
    nodes = [
        Node(1, "DSDTrainingDataset", dict(folder=TRAINING_DATA, reference_column="reference",
                                           target_column="target", caption_column="caption", min_image_size=256),
             pos=(40, 80), size=(340, 200)),
        Node(2, "DSDTrainLoRA", train, {"dataset": (1, 0)}, pos=(420, 80), size=(380, 760)),
        Node(3, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 340), size=(320, 320)),
        sampler(4, (840, 80), model=2, image=3, prompt="this character playing soccer"),
        Node(5, "SaveImage", dict(filename_prefix="dsd_trained"), {"images": (4, 0)}, pos=(1260, 80),
             size=(400, 440)),
        Node(6, "DSDPlotLoss", dict(width=800, height=480), {"loss": (2, 1)}, pos=(840, 600), size=(320, 130)),
        Node(7, "SaveImage", dict(filename_prefix="dsd_training_loss"), {"images": (6, 0)}, pos=(1260, 600),
             size=(400, 300), title="Loss curve"),
    ]
    notes = [
        ((40, -200), (760, 250),
         "DSD training: paired images -> a DSD model\n\n"
         "1. Put pairs in ComfyUI/input/dsd_pairs: the images and metadata.jsonl, one line per pair: "
         '{"reference": "ref/1.png", "target": "tgt/1.png", "caption": "this toy on a beach"}.\n'
         "2. FLUX.1-dev as a diffusers folder (with transformer/) in models/diffusers/FLUX.1-dev, or continue a DSD "
         "model from models/dsd (start_from).\n"
         "3. Queue. The progress bar shows the loss and validation images (reference | target | generated). Cancel "
         "saves a checkpoint; queue again with resume on to continue.\n\n"
         "The model lands in models/dsd/my_dsd (the DSD Model Loader lists it) and goes straight to the sampler."),
        ((840, -200), (420, 250),
         "Defaults: one 24 GB GPU (fp8 frozen transformer, rank 32, batch 1 x 4). Estimated peak memory is printed "
         "in the console before step 1. The paper: rank 512, lr 1e-4, batch 160 on 8x H100.\n"
         "DSD Save Trained Model copies a snapshot (standalone: with the full transformer)."),
    ]
    return nodes, notes


def custom_diffusion() -> tuple[list[Node], list[tuple]]:
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 420), size=(320, 320)),
        loader(2, (40, 80)),
        Node(5, "DSDConceptLoader", dict(concept="concept.safetensors"), pos=(40, 310), size=(320, 80)),
        Node(6, "DSDApplyConcept", dict(strength=1.0), {"dsd_model": (2, 0), "concept": (5, 0)}, pos=(400, 80),
             size=(300, 110)),
        sampler(3, (740, 80), model=6, image=1, prompt="this <new1> toy on a beach", seed=11),
        Node(4, "SaveImage", dict(filename_prefix="dsd_custom_diffusion"), {"images": (3, 0)}, pos=(1160, 80),
             size=(400, 440)),
    ]
    notes = [
        ((40, -220), (820, 260),
         "DSD with a Custom Diffusion concept\n\n"
         "When zero-shot DSD does not keep your subject, tune it once from 4-20 photos: add the node 'DSD Custom "
         "Diffusion Train' (instance_folder = your photos, instance_prompt = 'photo of a <new1> toy': a new word, "
         "then the class word; ~500 steps) or run `python -m dsd_core custom-diffusion train`. It writes "
         "models/dsd_concepts/<name>.safetensors.\n"
         "Here: 'DSD Load Concept' picks the file, 'DSD Apply Concept' adds it to the loaded model for the samplers "
         "it feeds, and the prompt uses the new word: 'this <new1> toy on a beach'.\n"
         "Merge two concepts with 'DSD Custom Diffusion Merge' (both words then work in one prompt); shrink a file "
         "with 'DSD Custom Diffusion Compress'."),
    ]
    return nodes, notes


def datagen() -> tuple[list[Node], list[tuple]]:
    """Self-distillation data generation, stage by stage, to look at grids, panels and verdicts."""
    nodes = [
        Node(1, "DSDGridPrompts", dict(captions="a red ceramic teapot with a bamboo handle\n"
                                                "a plush toy dragon with golden wings",
                                       layout="1x2", num=2, seed=0, prompter="template", gemini_model="",
                                       local_model=""), pos=(40, 80), size=(380, 300)),
        Node(2, "DSDFluxLoader", dict(base="FLUX.1-dev", dtype="auto", memory="full"), pos=(40, 420),
             size=(340, 130)),
        Node(3, "DSDGridGenerate", dict(steps=28, guidance=3.5, panel_size=512, batch_size=1),
             {"flux": (2, 0), "grid_prompts": (1, 0)}, pos=(460, 80), size=(320, 200)),
        Node(4, "PreviewImage", {}, {"images": (3, 0)}, pos=(820, 80), size=(400, 300), title="Grids"),
        Node(5, "DSDPanelSplit", dict(layout="1x2", panel_size=512, trim=True), {"grids": (3, 0)},
             pos=(460, 330), size=(320, 150)),
        Node(6, "PreviewImage", {}, {"images": (5, 0)}, pos=(820, 420), size=(400, 300), title="Panels"),
        Node(7, "DSDCuratePairs", dict(layout="1x2", curator="none", min_confidence=0.5, on_malformed="reject",
                                       gemini_model="", local_model="", instructions=""), {"panels": (5, 0)},
             pos=(460, 520), size=(340, 330)),
        Node(8, "SaveImage", dict(filename_prefix="dsd_datagen_kept"), {"images": (7, 0)}, pos=(1260, 80),
             size=(400, 300), title="Kept pairs"),
        Node(9, "PreviewImage", {}, {"images": (7, 1)}, pos=(1260, 420), size=(400, 300), title="Rejected pairs"),
    ]
    notes = [
        ((40, -200), (760, 240),
         "DSD data generation, stage by stage (FLUX makes its own training pairs)\n\n"
         "Grid Prompts turns seed captions into prompts for grids of one subject in different scenes; FLUX Loader "
         "loads plain FLUX.1-dev (models/diffusers/FLUX.1-dev with its transformer/); Grid Generate draws them; "
         "Panel Split cuts them (borders and gutters trimmed); Curate Pairs asks a VLM whether each pair shows the "
         "identical subject.\n"
         "curator: none keeps every pair; pick gemini (set GEMINI_API_KEY before starting ComfyUI) or local (a VLM "
         "folder under models/LLM) to curate. The verdicts output explains each decision.\n"
         "To write a training dataset (resumable), use the DSD Data Generation (to folder) node, or at scale: "
         "accelerate launch -m dsd_core datagen (see the README)."),
    ]
    return nodes, notes


def distill() -> tuple[list[Node], list[tuple]]:
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 330), size=(320, 320)),
        loader(2, (40, 80)),
        Node(3, "DSDTeacherPairs", dict(prompts="this character playing soccer\nthis character reading a book\n"
                                                 "this character on a beach at sunset", panel_size=512, steps=28,
                                        seed=0),
             {"dsd_model": (2, 0), "images": (1, 0)}, pos=(420, 80), size=(340, 260)),
        Node(4, "DSDBuildStudent", dict(preset="quarter", double_blocks="", single_blocks="",
                                        student_name="dsd_student"),
             {"dsd_model": (2, 0)}, pos=(420, 380), size=(340, 200)),
        Node(5, "DSDDistillStudent", dict(steps=500, learning_rate=1e-5, lambda_out=0.5, lambda_feat=0.5,
                                          batch_size=1, panel_size=512, output_name="dsd_student_distilled"),
             {"dsd_model": (2, 0), "student": (4, 0), "dataset": (3, 0)}, pos=(800, 80), size=(360, 320)),
        Node(8, "PreviewImage", {}, {"images": (5, 2)}, pos=(800, 440), size=(360, 240), title="Loss"),
        sampler(6, (1200, 80), model=5, image=1, prompt="this character playing soccer"),
        Node(7, "SaveImage", dict(filename_prefix="dsd_distill_student"), {"images": (6, 0)}, pos=(1620, 80),
             size=(400, 440)),
        Node(9, "DSDCompareStudent", dict(pairs=2, steps=28, seed=0, panel_size=512),
             {"dsd_model": (2, 0), "student": (5, 1), "dataset": (3, 0)}, pos=(1200, 600), size=(360, 220)),
        Node(10, "SaveImage", dict(filename_prefix="dsd_distill_compare"), {"images": (9, 0)}, pos=(1620, 600),
             size=(600, 320), title="reference | teacher | student"),
    ]
    notes = [
        ((40, -200), (760, 240),
         "DSD distillation: a smaller, faster DSD for your device\n\n"
         "1. DSD Teacher Pairs: the full DSD model paints a small dataset from your reference(s) and prompts.\n"
         "2. DSD Build Student: keeps ~1/4 (quarter: 5+10 blocks, ~3.2 B parameters) or ~1/2 of the teacher's "
         "blocks; saved to models/dsd/dsd_student.\n"
         "3. DSD Distill Student: trains the student to match the teacher (flow + output + feature losses). Cancel "
         "saves a checkpoint; queue again to continue. A real student needs thousands of steps and many pairs "
         "(see the README); 500 is a start.\n"
         "4. The distilled model (models/dsd/dsd_student_distilled) samples like any DSD model; DSD Compare "
         "Student shows teacher and student side by side with a report (speed ratio, PSNR, memory)."),
        ((820, -200), (500, 240),
         "Knobs\n\npreset: quarter (smallest, fastest) or half (closer to the teacher).\n"
         "double_blocks / single_blocks: your own lists, e.g. '0-4' and '0-9'.\n"
         "learning_rate 1e-5 and lambda 0.5 / 0.5 are BK-SDM's settings.\n"
         "Then quantise (memory preset 12gb: fp8) and personalise the student with DSD LoRA training."),
    ]
    return nodes, notes


# ------------------------------------------------------------------------------------------------ native path
def native_graph(prefix, prompt, seed, image_guidance, unet="flux1-dev.safetensors", weight_dtype="default",
                 c_embedder="dsd_c_embedder.safetensors", style_loras=()) -> list[Node]:
    """DSD on ComfyUI's own loaders and SamplerCustomAdvanced (see nodes/native.py)."""
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 700), size=(320, 320)),
        Node(2, "UNETLoader", dict(unet_name=unet, weight_dtype=weight_dtype), pos=(40, 60), size=(320, 90)),
        Node(3, "LoraLoaderModelOnly", dict(lora_name="dsd_lora.safetensors", strength_model=1.0),
             {"model": (2, 0)}, pos=(40, 190), size=(320, 90), title="DSD LoRA"),
    ]
    model = 3
    for k, (name, strength) in enumerate(style_loras):
        nid = 20 + k
        nodes.append(Node(nid, "LoraLoaderModelOnly", dict(lora_name=name, strength_model=strength),
                          {"model": (model, 0)}, pos=(40, 320 + 130 * k), size=(320, 90), title="Your LoRA"))
        model = nid
    y = 320 + 130 * len(style_loras)
    nodes += [
        Node(4, "DSDApplyNative", dict(c_embedder_file=c_embedder), {"model": (model, 0)}, pos=(40, y),
             size=(320, 80)),
        Node(5, "DualCLIPLoader", dict(clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                                       type="flux", device="default"), pos=(400, 60), size=(320, 130)),
        Node(6, "DSDTextEncode", dict(prompt=prompt, t5_padding="512"), {"clip": (5, 0)}, pos=(400, 230),
             size=(320, 160), title="Prompt"),
        Node(7, "DSDTextEncode", dict(prompt="", t5_padding="512"), {"clip": (5, 0)}, pos=(400, 430),
             size=(320, 160), title="Empty prompt (true guidance)"),
        Node(8, "VAELoader", dict(vae_name="ae.safetensors"), pos=(400, 640), size=(320, 60)),
        Node(9, "DSDNativeConditioning", dict(guidance=3.5, panel_size=512, batch_size=1, fit="center_crop"),
             {"positive": (6, 0), "negative": (7, 0), "vae": (8, 0), "image": (1, 0)}, pos=(760, 230),
             size=(320, 230)),
        Node(10, "DSDGuider", dict(image_guidance=image_guidance, text_guidance=1.0, start_step=2, end_step=-1),
             {"model": (4, 0), "positive": (9, 0), "image_only": (9, 1), "unconditional": (9, 2)},
             pos=(1120, 60), size=(320, 200)),
        Node(11, "RandomNoise", dict(noise_seed=seed), pos=(1120, 300), size=(320, 90)),
        Node(12, "KSamplerSelect", dict(sampler_name="euler"), pos=(1120, 430), size=(320, 60)),
        Node(13, "DSDScheduler", dict(steps=28, panel_size=512), pos=(1120, 530), size=(320, 90)),
        Node(14, "SamplerCustomAdvanced", {}, {"noise": (11, 0), "guider": (10, 0), "sampler": (12, 0),
                                               "sigmas": (13, 0), "latent_image": (9, 3)},
             pos=(1480, 60), size=(300, 130)),
        Node(15, "VAEDecode", {}, {"samples": (14, 0), "vae": (8, 0)}, pos=(1480, 230), size=(220, 50)),
        Node(16, "DSDSplitCanvas", {}, {"canvas": (15, 0)}, pos=(1480, 320), size=(260, 60)),
        Node(17, "SaveImage", dict(filename_prefix=prefix), {"images": (16, 0)}, pos=(1820, 60), size=(400, 440)),
        Node(18, "PreviewImage", {}, {"images": (16, 1)}, pos=(1820, 540), size=(300, 300),
             title="Reference reconstruction"),
    ]
    return nodes


NATIVE_NOTE = (
    "DSD, ComfyUI-native: FLUX.1-dev from your own loaders\n\n"
    "models/diffusion_models/flux1-dev.safetensors: the FLUX.1-dev you already have (or the DSD transformer itself).\n"
    "models/dsd/dsd_c_embedder.safetensors: DSD's extra layer, 400 KB: python -m dsd_core extract-c-embedder "
    "dsd_transformer.safetensors models/dsd/dsd_c_embedder.safetensors (or pick the DSD transformer file in DSD "
    "Apply).\nmodels/loras/dsd_lora.safetensors: primecai/dsd_model's pytorch_lora_weights.safetensors, renamed.\n"
    "clip_l + t5xxl + ae: the usual FLUX text encoders and VAE.\n\n"
    "Defaults are the official settings (28 euler steps on DSD Scheduler's sigmas, guidance 3.5, 512 px panels).")


def native() -> tuple[list[Node], list[tuple]]:
    notes = [((40, -240), (700, 250), NATIVE_NOTE),
             ((780, -240), (640, 250),
              "What differs from the DSD Sampler path (the reference's exact pipeline)\n\n"
              "VAE encode uses the posterior mode (the reference samples it); a batch shares one noise tensor "
              "(DSD Sampler: seeds seed, seed+1, ...). DSD Text Encode pads T5 to 512 tokens as the reference does.\n"
              "Everything else (c_embedder, LoRA, sigmas, guidance formula and gates) is the same math.")]
    return native_graph("dsd_native", "this character playing soccer", 0, 1.0), notes


def native_true_guidance() -> tuple[list[Node], list[tuple]]:
    notes = [((40, -240), (700, 250), NATIVE_NOTE),
             ((780, -240), (640, 250),
              "True guidance\n\nDSD Guider: image_guidance > 1 adds two passes per step from start_step 2 (empty "
              "prompt + reference, and neither): u + s_i (ui - u) + s_t (c - ui). 1.5 / 1.0 are the official demo's "
              "values; text_guidance only acts when image_guidance > 1. end_step -1 = to the end (reference).")]
    return native_graph("dsd_native_true_guidance", "this character surfing a big wave, golden hour", 42, 1.5), notes


def native_fp8_lora_stack() -> tuple[list[Node], list[tuple]]:
    notes = [((40, -240), (700, 250),
              "DSD with fp8 weights and your own LoRAs\n\n"
              "UNETLoader loads the DSD transformer file and stores it as fp8 (half the memory; a GGUF loader works the "
              "same way; ComfyUI ignores the file's c_embedder, DSD Apply adds it from the patch or from this same "
              "file).\n"
              "Your LoRAs stack after the DSD LoRA with LoraLoaderModelOnly as in any FLUX workflow; keep their "
              "strength moderate, DSD's identity comes from its own LoRA.")]
    return native_graph("dsd_native_fp8_loras", "this character as a watercolor painting", 7, 1.0,
                        unet="dsd_transformer.safetensors", weight_dtype="fp8_e4m3fn",
                        style_loras=[("flux_style_lora.safetensors", 0.6)]), notes


GRAPHS = {"dsd_basic": basic, "dsd_true_guidance": true_guidance, "dsd_comfy_files": comfy_files,
          "dsd_native": native, "dsd_native_true_guidance": native_true_guidance,
          "dsd_native_fp8_loras": native_fp8_lora_stack, "dsd_training": training, "dsd_datagen": datagen,
          "dsd_custom_diffusion": custom_diffusion, "dsd_distill": distill}


def to_api(nodes: list[Node]) -> dict:
    api = {}
    for n in nodes:
        inputs = {k: v for k, v in n.widgets.items()}
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.inputs.items()})
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return api


def to_ui(nodes: list[Node], notes: list[tuple]) -> dict:
    links, ui_nodes = [], []
    by_id = {n.id: n for n in nodes}
    out_links: dict[tuple, list[int]] = {}
    for n in nodes:
        iface = INTERFACES[n.type]
        for slot, (name, typ) in enumerate(iface["links"]):
            if name in n.inputs:
                src, src_slot = n.inputs[name]
                link_id = len(links) + 1
                links.append([link_id, src, src_slot, n.id, slot, typ])
                out_links.setdefault((src, src_slot), []).append(link_id)
    next_id = max(by_id) + 1
    for order, n in enumerate(nodes):
        iface = INTERFACES[n.type]
        values = []
        for name, value in n.widgets.items():
            values.append(value)
            if (n.type, name) in CONTROL_AFTER_GENERATE:
                values.append(CONTROL_AFTER_GENERATE[(n.type, name)])
        values += list(iface.get("extra_widgets", {}).values())
        link_of = {(l[3], l[4]): l[0] for l in links}
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
            "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": link_of.get((n.id, slot))}
                       for slot, (name, typ) in enumerate(iface["links"])],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(iface["outputs"])],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": values,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    for (pos, size, text) in notes:
        ui_nodes.append({"id": next_id, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        next_id += 1
    return {"last_node_id": next_id - 1, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": dict(VIEW)}, "version": 0.4}


# ---------------------------------------------------------------------------------------------- thumbnails
#: colours in the spirit of ComfyUI's dark theme; links coloured by type
THEME = dict(background=(32, 32, 32), grid=(40, 40, 40), node=(53, 53, 53), title=(34, 34, 34), outline=(10, 10, 10),
             text=(221, 221, 221), note=(102, 85, 51), note_title=(68, 51, 34), slot=(150, 150, 150))
LINK_COLOURS = {"IMAGE": (100, 181, 246), "DSD_MODEL": (178, 120, 255), "STRING": (119, 221, 119),
                "MASK": (129, 199, 132)}


def display_title(node: dict) -> str:
    """The title a node shows: its own title, else its type split into words ('DSDModelLoader' -> 'DSD Model Loader')."""
    return node.get("title") or re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", node["type"])


def thumbnail_shapes(ui: dict, size: int = THUMBNAIL_SIZE) -> list[tuple]:
    """What a UI workflow's thumbnail shows, as drawing primitives in integer pixels of a ``2*size`` canvas.

    ``("link", colour, points)``, ``("box", fill, outline, x0, y0, x1, y1)``, ``("text", colour, x, y, max_w, text)``,
    ``("dot", colour, x, y)``: node boxes with title bars, slots, links as LiteGraph's curves, each note's first line.
    Pure integer geometry from the graph, so its fingerprint (:func:`thumbnail_fingerprint`) is exact everywhere.
    """
    big = 2 * size
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    margin = 48
    k = min((big - 2 * margin) / (x1 - x0), (big - 2 * margin) / (y1 - y0))
    ox = (big - (x1 - x0) * k) / 2 - x0 * k
    oy = (big - (y1 - y0) * k) / 2 - y0 * k

    def at(x, y):
        return int(round(x * k + ox)), int(round(y * k + oy))

    by_id = {n["id"]: n for n in ui["nodes"]}

    def slot_xy(node, slot, output):
        return at(node["pos"][0] + (node["size"][0] if output else 0), node["pos"][1] + 14 + 20 * slot)

    shapes = []
    for _, src, src_slot, dst, dst_slot, typ in ui["links"]:  # under the nodes, cubic curves as LiteGraph draws them
        (ax, ay), (bx, by) = slot_xy(by_id[src], src_slot, True), slot_xy(by_id[dst], dst_slot, False)
        d = max(40, abs(bx - ax) // 2)
        pts = []
        for i in range(33):
            t, u = i / 32, 1 - i / 32
            pts.append((int(round(u ** 3 * ax + 3 * u * u * t * (ax + d) + 3 * u * t * t * (bx - d) + t ** 3 * bx)),
                        int(round(u ** 3 * ay + 3 * u * u * t * ay + 3 * u * t * t * by + t ** 3 * by))))
        shapes.append(("link", LINK_COLOURS.get(typ, THEME["slot"]), pts))
    for n, (bx0, by0, bx1, by1) in zip(ui["nodes"], boxes):
        note = n["type"] in ("Note", "MarkdownNote")
        (ax, ay), (cx, cy) = at(bx0, by0), at(bx1, by1)
        title_bottom = at(bx0, n["pos"][1])[1]
        shapes.append(("box", THEME["note" if note else "node"], THEME["outline"], ax, ay, cx, cy))
        shapes.append(("box", THEME["note_title" if note else "title"], THEME["outline"], ax, ay, cx, title_bottom))
        pad = 12
        shapes.append(("text", THEME["text"], ax + pad, ay + max(2, (title_bottom - ay - 22) // 2), cx - ax - 2 * pad,
                       "Note" if note else display_title(n)))
        if note:  # the note's first line, as a hint of what it explains
            first = (n.get("widgets_values") or [""])[0].split("\n", 1)[0]
            shapes.append(("text", THEME["text"], ax + pad, title_bottom + pad, cx - ax - 2 * pad, first))
        for slot in range(len(n.get("inputs", []))):
            shapes.append(("dot", THEME["slot"], *slot_xy(n, slot, False)))
        for slot in range(len(n.get("outputs", []))):
            shapes.append(("dot", THEME["slot"], *slot_xy(n, slot, True)))
    return shapes


def thumbnail_fingerprint(ui: dict, size: int = THUMBNAIL_SIZE) -> str:
    """sha256 of the thumbnail's shapes: stored in the JPEG's comment, compared by ``--check``."""
    import hashlib

    data = json.dumps([size, THEME, thumbnail_shapes(ui, size)], sort_keys=True, separators=(",", ":"))
    return "dsd-thumbnail sha256:" + hashlib.sha256(data.encode()).hexdigest()


def render_thumbnail(ui: dict, size: int = THUMBNAIL_SIZE):
    """A picture of a UI workflow (PIL RGB image, ``size`` x ``size``), drawn at 2x from :func:`thumbnail_shapes`
    with Pillow's built-in bitmap font only (no system fonts), then reduced."""
    from PIL import Image, ImageDraw, ImageFont

    big = 2 * size
    im = Image.new("RGB", (big, big), THEME["background"])
    draw = ImageDraw.Draw(im)
    for g in range(0, big, 64):
        draw.line([(g, 0), (g, big)], fill=THEME["grid"])
        draw.line([(0, g), (big, g)], fill=THEME["grid"])
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else ImageFont.load_default()

    def text(x, y, s, colour, max_w):
        """Bitmap text at 2x (nearest-neighbour), cut with '.' to ``max_w`` px."""
        w, h = draw.textbbox((0, 0), s, font=font)[2:]
        while s and w * 2 > max_w:
            s = s[:-2] + "." if len(s) > 2 else ""
            w, h = draw.textbbox((0, 0), s, font=font)[2:]
        if not s:
            return
        tile = Image.new("L", (w + 1, h + 1), 0)
        ImageDraw.Draw(tile).text((0, 0), s, fill=255, font=font)
        tile = tile.resize((tile.width * 2, tile.height * 2), Image.NEAREST)
        im.paste(Image.new("RGB", tile.size, colour), (x, y), tile)

    for shape in thumbnail_shapes(ui, size):
        kind = shape[0]
        if kind == "link":
            draw.line(shape[2], fill=shape[1], width=6)
        elif kind == "box":
            draw.rectangle(shape[3:7], fill=shape[1], outline=shape[2], width=2)
        elif kind == "text":
            text(shape[2], shape[3], shape[5], shape[1], shape[4])
        else:
            _, colour, x, y = shape
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
    return im.resize((size, size), Image.LANCZOS)


def encode_jpeg(image, comment: str = "") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, optimize=False, progressive=False, subsampling=0,
               comment=comment.encode())
    return buf.getvalue()


def thumbnail(ui: dict) -> bytes:
    """The thumbnail JPEG of a UI workflow, its fingerprint in the JPEG comment."""
    return encode_jpeg(render_thumbnail(ui), thumbnail_fingerprint(ui))


def jpeg_comment(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            comment = im.info.get("comment", b"")
    except OSError:
        return None
    return comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)


def same_thumbnail(current: bytes, fresh: bytes) -> bool:
    """Equal bytes, or (another Pillow/libjpeg encodes other bytes for the same drawing) equal fingerprints."""
    return current == fresh or (jpeg_comment(current) or "") == jpeg_comment(fresh)


# ---------------------------------------------------------------------------------------------- files
def laid_out(nodes: list[Node], notes: list[tuple]) -> tuple[list[Node], list[tuple]]:
    """Every graph's notes in one row at the top of the first view, tall enough for their text, and the nodes moved
    down (all by the same amount) so that none starts above the row's lower edge. A graph may give its notes
    anywhere: only their widths and texts count."""
    if not notes:
        return nodes, notes
    widths = [size[0] for _, size, _ in notes]
    room = FIRST_VIEW[0] - 2 * 40 - 40 * (len(notes) - 1)  # margins and gaps of notes_row
    if sum(widths) > room:  # narrower notes (taller, as their text needs) so the row fits the first view
        widths = [w * room // sum(widths) for w in widths]
    notes = notes_row(*[(w, text) for w, (_, _, text) in zip(widths, notes)])
    shift = below(notes) - min(n.pos[1] for n in nodes)
    if shift > 0:
        for n in nodes:
            n.pos = (n.pos[0], n.pos[1] + shift)
    return nodes, notes


def render() -> dict[str, bytes]:
    """Every generated file, relative to workflows/: UI json, its thumbnail, API json."""
    files = {}
    for name, build in GRAPHS.items():
        nodes, notes = laid_out(*build())
        ui = to_ui(nodes, notes)
        files[f"{name}.json"] = (json.dumps(ui, indent=2) + "\n").encode()
        files[f"{name}.jpg"] = thumbnail(ui)
        files[f"{API_DIR}/{name}.json"] = (json.dumps(to_api(nodes), indent=2) + "\n").encode()
    return files


def stray_files(generated) -> list[str]:
    """Files in workflows/ and workflows/api/ that look generated (json, jpg) but are not: ComfyUI would list them."""
    out = []
    for sub in ("", API_DIR):
        folder = os.path.join(HERE, sub)
        if os.path.isdir(folder):
            for n in sorted(os.listdir(folder)):
                rel = f"{sub}/{n}" if sub else n
                if n.endswith((".json", ".jpg", ".jpeg", ".png", ".webp")) and rel not in generated:
                    out.append(rel)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed files are up to date")
    args = ap.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from dsd_core.files import write_bytes

    stale = []
    files = render()
    for name, data in files.items():
        path = os.path.join(HERE, name)
        current = open(path, "rb").read() if os.path.exists(path) else None
        fresh = current is not None and (same_thumbnail(current, data) if name.endswith(".jpg") else current == data)
        if not fresh:
            stale.append(name)
            if not args.check:
                write_bytes(path, data)
    stray = stray_files(files)
    if args.check and (stale or stray):
        if stale:
            print(f"out of date: {', '.join(stale)}; run python workflows/make_workflows.py", file=sys.stderr)
        if stray:
            print(f"not generated (ComfyUI would list them as templates): {', '.join(stray)}; "
                  "run python workflows/make_workflows.py to remove them", file=sys.stderr)
        return 1
    if not args.check:
        for rel in stray:
            os.remove(os.path.join(HERE, rel))
    verb = "stale" if args.check else "wrote"
    print("\n".join([f"{verb} {s}" for s in stale] + [f"removed {s}" for s in stray]) or "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
