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
}
#: Widgets whose UI value is followed by the "control after generate" value.
CONTROL_AFTER_GENERATE = {("DSDSampler", "seed"): "fixed", ("RandomNoise", "noise_seed"): "fixed"}


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
             size=(320, 120), title="Empty prompt (true guidance)"),
        Node(8, "VAELoader", dict(vae_name="ae.safetensors"), pos=(400, 590), size=(320, 60)),
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
          "dsd_native_fp8_loras": native_fp8_lora_stack}


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
