"""The one source of the shipped workflows: writes each graph in ComfyUI's UI format and in the API format.

    python workflows/make_workflows.py          # rewrite workflows/*.json
    python workflows/make_workflows.py --check  # exit 1 if a committed file differs (tests run this)

UI files (``<name>.json``) are what users drag onto ComfyUI: nodes with widget values, links, and notes on the
canvas explaining the knobs. API files (``<name>.api.json``) are what headless clients POST to ``/prompt``.
Both come from the same ``Graph`` below, so they cannot drift. The graphs name the standard model folders
``models/dsd/dsd_model`` and ``models/diffusers/FLUX.1-dev`` and the input image ``dsd_reference.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_IMAGE = "dsd_reference.png"


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
                                ("prompt_used", "STRING")]),
    "DSDPromptEnhancer": dict(links=[("image", "IMAGE")], outputs=[("prompt", "STRING"), ("caption", "STRING")]),
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
CONTROL_AFTER_GENERATE = {("DSDSampler", "seed"): "fixed", ("DSDTeacherPairs", "seed"): "fixed",
                          ("DSDCompareStudent", "seed"): "fixed"}


def loader(id, pos):
    return Node(id, "DSDModelLoader", dict(model="dsd_model", base="FLUX.1-dev", dtype="auto", memory="full",
                                           speed="exact", download_missing=False), pos=pos, size=(340, 200))


def sampler(id, pos, model, image, prompt="this character playing soccer", seed=0, image_guidance=1.0,
            text_guidance=1.0, extra_inputs=None):
    widgets = dict(prompt=prompt, seed=seed, steps=28, guidance=3.5, image_guidance=image_guidance,
                   text_guidance=text_guidance, panel_size=512, batch_size=1, lora_scale=1.0,
                   condition_sampling="sample", fit="center_crop")
    inputs = {"dsd_model": (model, 0), "image": (image, 0), **(extra_inputs or {})}
    return Node(id, "DSDSampler", widgets, inputs, pos=pos, size=(380, 420))


def basic() -> tuple[list[Node], list[tuple]]:
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 330), size=(320, 320)),
        loader(2, (40, 80)),
        sampler(3, (420, 80), model=2, image=1),
        Node(4, "SaveImage", dict(filename_prefix="dsd_basic"), {"images": (3, 0)}, pos=(840, 80), size=(400, 440)),
        Node(5, "PreviewImage", {}, {"images": (3, 1)}, pos=(840, 560), size=(300, 300),
             title="Reference reconstruction"),
    ]
    notes = [
        ((40, -160), (560, 210),
         "DSD basic generation\n\n"
         "1. Put primecai/dsd_model into models/dsd/dsd_model (transformer/ + pytorch_lora_weights.safetensors) and a "
         "diffusers FLUX.1-dev folder into models/diffusers/FLUX.1-dev, or switch download_missing on.\n"
         "2. Load your reference image (any size; it is center-cropped to a square).\n"
         "3. Describe what the subject should do: 'this character playing soccer', 'this logo on a T-shirt'.\n\n"
         "Defaults are the official DSD settings: 28 steps, guidance 3.5, 512 px panels."),
        ((420, -160), (380, 210),
         "Knobs\n\nguidance: FLUX distilled guidance (3.5). Raise it if the subject drifts.\n"
         "seed: same seed, same image. batch_size: seeds seed, seed+1, ...\n"
         "panel_size: 512 is what DSD was trained at; above 768 it distorts.\n"
         "For stronger identity, see the true-guidance workflow."),
    ]
    return nodes, notes


def true_guidance() -> tuple[list[Node], list[tuple]]:
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 330), size=(320, 320)),
        loader(2, (40, 80)),
        Node(6, "DSDImagePrep", dict(fit="center_crop", resample="bicubic", panel_size=512, pad_color="white"),
             {"image": (1, 0)}, pos=(420, 500), size=(320, 170)),
        sampler(3, (780, 80), model=2, image=6, prompt="this character surfing a big wave, golden hour",
                seed=42, image_guidance=1.5, text_guidance=1.0),
        Node(4, "SaveImage", dict(filename_prefix="dsd_true_guidance"), {"images": (3, 0)}, pos=(1200, 80),
             size=(400, 440)),
    ]
    notes = [
        ((40, -160), (700, 210),
         "DSD with true guidance\n\n"
         "image_guidance > 1 adds two extra passes per step (from step 2): one with an empty prompt and the reference, "
         "one with neither. The result follows the reference's identity more closely; it takes ~3x longer.\n"
         "image_guidance 1.5 / text_guidance 1.0 are the official demo's defaults. text_guidance only acts when "
         "image_guidance > 1; raise it to follow the prompt more.\n\n"
         "DSD Image Prep: center_crop is the official preprocessing; pad keeps the whole picture (product shots)."),
    ]
    return nodes, notes


def comfy_files() -> tuple[list[Node], list[tuple]]:
    nodes = [
        Node(1, "LoadImage", dict(image=REFERENCE_IMAGE), pos=(40, 330), size=(320, 320)),
        Node(2, "DSDFilesLoader", dict(transformer="dsd_transformer.safetensors", lora="dsd_lora.safetensors",
                                       clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
                                       vae="ae.safetensors", dtype="auto", memory="full", speed="exact"),
             pos=(40, 40), size=(340, 230)),
        sampler(3, (420, 80), model=2, image=1, prompt="this character reading a book in a cozy library", seed=7),
        Node(4, "SaveImage", dict(filename_prefix="dsd_comfy_files"), {"images": (3, 0)}, pos=(840, 80),
             size=(400, 440)),
    ]
    notes = [
        ((40, -200), (760, 220),
         "DSD from the files you already have (nothing downloaded)\n\n"
         "models/text_encoders: clip_l.safetensors and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn); models/vae: "
         "ae.safetensors - the same files FLUX workflows use.\n"
         "models/diffusion_models/dsd_transformer.safetensors: primecai/dsd_model's "
         "transformer/diffusion_pytorch_model.safetensors, renamed (bf16, fp8 and the original FLUX key layout "
         "work too).\nmodels/loras/dsd_lora.safetensors: its pytorch_lora_weights.safetensors, renamed.\n"
         "The tokenizers come from ComfyUI itself."),
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
             {"dsd_model": (2, 0), "student": (5, 1), "dataset": (3, 0)}, pos=(1200, 560), size=(360, 220)),
        Node(10, "SaveImage", dict(filename_prefix="dsd_distill_compare"), {"images": (9, 0)}, pos=(1620, 560),
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
        Node(6, "DSDPlotLoss", dict(width=800, height=480), {"loss": (2, 1)}, pos=(840, 540), size=(320, 130)),
        Node(7, "SaveImage", dict(filename_prefix="dsd_training_loss"), {"images": (6, 0)}, pos=(1260, 560),
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


GRAPHS = {"dsd_basic": basic, "dsd_true_guidance": true_guidance, "dsd_comfy_files": comfy_files,
          "dsd_distill": distill, "dsd_training": training}


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
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [100, 220]}}, "version": 0.4}


def render() -> dict[str, str]:
    files = {}
    for name, build in GRAPHS.items():
        nodes, notes = build()
        files[f"{name}.json"] = json.dumps(to_ui(nodes, notes), indent=2) + "\n"
        files[f"{name}.api.json"] = json.dumps(to_api(nodes), indent=2) + "\n"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = os.path.join(HERE, name)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
            stale.append(name)
            if not args.check:
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python workflows/make_workflows.py", file=sys.stderr)
        return 1
    print("\n".join(f"{'wrote' if not args.check else 'stale'} {s}" for s in stale) or "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
