"""A tiny, randomly initialised DSD model set of the real architecture, built offline and deterministically.

``python -m dsd_core tiny-model OUT_DIR`` writes::

    OUT_DIR/base/           FLUX.1-dev-shaped diffusers folder: VAE (16 latent channels, 8x), CLIP-L and T5 text
                            encoders with tokenizer files, the FLUX.1-dev scheduler config, a plain FLUX transformer
    OUT_DIR/dsd/transformer/  DSD transformer (config.json + safetensors, non-zero c_embedder)
    OUT_DIR/dsd/pytorch_lora_weights.safetensors   rank-4 LoRA on the attention projections
    OUT_DIR/reference.png   a synthetic reference image

``--comfy-files`` adds the same weights as ComfyUI single files under ``OUT_DIR/comfyui_models``;
``--comfyui MODELS_DIR`` lays the whole set out in a ComfyUI ``models`` folder (:func:`write_tiny_comfy_models`).

It exists for smoke tests, demos and CI: the weights are random, so **its images are noise**. Everything runs on a
CPU in seconds. Same code, same files: the safetensors written are byte-identical from run to run.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .files import apply_umask, save_safetensors

# Sizes follow the constraints of FLUX: sum(axes_dims_rope) == attention_head_dim, joint_attention_dim == T5 d_model,
# pooled_projection_dim == CLIP hidden size, four VAE blocks so the VAE scale factor is 8.
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)
#: The same tiny model loadable by ComfyUI's own FLUX loaders, which assume head size 128 (num_heads = hidden // 128)
#: and rope axes (16, 56, 56): one head of 128, one double and one single block (``write_tiny_native_files``).
COMFY_TRANSFORMER_CONFIG = dict(TRANSFORMER_CONFIG, attention_head_dim=128, num_attention_heads=1,
                                axes_dims_rope=(16, 56, 56), num_layers=1, num_single_layers=1)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=64,
)
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
WORDS = ["a", "photo", "of", "the", "this", "cat", "dog", "character", "playing", "soccer", "sitting", "on", "red",
         "chair", "in", "with", "hat", "wearing", "beach", "forest", "city", "man", "woman", "toy", "logo"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (256 characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: bytes, bytes+</w>, whole-word merges for a small word list, BOS/EOS."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((a b) c) ... -> the whole word
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    """A Unigram T5 tokenizer: <pad>, </s>, <unk>, then characters, '▁'+characters and '▁'+words; 100 extra ids."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -5.0) for c in letters] + [("▁" + c, -6.0) for c in letters]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)


def build_components(seed: int = 0, transformer_config: dict | None = None) -> dict:
    """All pipeline components in memory (float32, eval mode), each built right after ``torch.manual_seed``.

    ``transformer_config`` replaces :data:`TRANSFORMER_CONFIG` (e.g. :data:`COMFY_TRANSFORMER_CONFIG`).
    """
    transformer_config = transformer_config or TRANSFORMER_CONFIG
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .transformer import DSDTransformer2DModel

    tok = build_clip_tokenizer()
    tok2 = build_t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=32, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=128, vocab_size=len(tok2),
        pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id, decoder_start_token_id=0))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 3)
    base_transformer = FluxTransformer2DModel(**transformer_config)
    torch.manual_seed(seed + 4)
    dsd = DSDTransformer2DModel(**transformer_config)
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        dsd.c_embedder.weight.copy_(torch.randn(dsd.c_embedder.weight.shape, generator=g) * 0.2)
        dsd.c_embedder.bias.copy_(torch.randn(dsd.c_embedder.bias.shape, generator=g) * 0.02)
    for m in (clip, t5, vae, base_transformer, dsd):
        m.eval()
    return dict(tokenizer=tok, tokenizer_2=tok2, text_encoder=clip, text_encoder_2=t5, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), transformer=base_transformer,
                dsd_transformer=dsd)


def lora_state_dict(transformer, rank: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """A random rank-``rank`` PEFT LoRA for ``transformer`` (built on a copy), with its adapter config."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(transformer)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    transformer.add_adapter(config, adapter_name="tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = get_peft_model_state_dict(transformer, adapter_name="tiny")
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in transformer.peft_config["tiny"].to_dict().items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, metadata


def save_lora(path: str, lora: dict, adapter_config: dict) -> None:
    """Write a LoRA as diffusers does (``transformer.``-prefixed keys, adapter config in the header), deterministically."""
    meta = json.dumps({f"transformer.{k}": v for k, v in adapter_config.items()}, indent=2, sort_keys=True)
    # one metadata key only: safetensors writes the metadata map in hash order, so two keys can swap between runs
    save_safetensors({f"transformer.{k}": v for k, v in lora.items()}, path, metadata={"lora_adapter_metadata": meta})


def reference_image(width: int = 640, height: int = 480, seed: int = 0) -> PIL.Image.Image:
    """A synthetic reference: a gradient background with a few coloured shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    bg = np.stack([x / width * 200 + 30, y / height * 180 + 40, np.full_like(x, 120.0)], -1).astype(np.uint8)
    im = PIL.Image.fromarray(bg)
    draw = PIL.ImageDraw.Draw(im)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, max(1, width * 3 // 4))), int(rng.integers(0, max(1, height * 3 // 4)))
        w, h = int(rng.integers(1, max(2, width // 2))), int(rng.integers(1, max(2, height // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=color)
    return im


#: Where :func:`write_tiny_comfy_files` puts each file, relative to a ComfyUI ``models`` folder.
COMFY_FILES = {
    "transformer": "diffusion_models/dsd_transformer.safetensors",
    "lora": "loras/dsd_lora.safetensors",
    "clip_l": "text_encoders/clip_l.safetensors",
    "t5xxl": "text_encoders/t5xxl_fp16.safetensors",
    "vae": "vae/ae.safetensors",
    "tokenizers": "dsd/tokenizers",
}


#: Where :func:`write_tiny_native_files` puts each file (head-128 transformer; the text encoders and VAE stay tiny,
#: so ComfyUI's stock CLIP/VAE loaders cannot read them: tests feed them through test-only nodes).
NATIVE_FILES = dict(COMFY_FILES, transformer="diffusion_models/dsd_transformer_h128.safetensors",
                    base_transformer="diffusion_models/flux_h128.safetensors",
                    lora="loras/dsd_lora_h128.safetensors", extra_lora="loras/style_lora_h128.safetensors",
                    clip_l="text_encoders/clip_l_h128set.safetensors", t5xxl="text_encoders/t5xxl_h128set.safetensors",
                    vae="vae/ae_h128set.safetensors", tokenizers="dsd/tokenizers_h128set")


def write_tiny_native_files(models_dir: str, seed: int = 0) -> dict[str, str]:
    """A tiny DSD set whose transformer ComfyUI's ``UNETLoader`` reads (:data:`COMFY_TRANSFORMER_CONFIG`).

    Files (paths in :data:`NATIVE_FILES`): the DSD transformer (diffusers layout, with ``c_embedder``), the plain FLUX
    transformer whose weights the DSD one equals apart from ``c_embedder`` (as a real DSD file may equal FLUX.1-dev),
    the DSD LoRA, a second LoRA (a user's style LoRA for stacking tests), and the tiny text encoders, VAE and
    tokenizers as in :func:`write_tiny_comfy_files`.
    """
    from safetensors.torch import save_file

    c = build_components(seed, COMFY_TRANSFORMER_CONFIG)
    dsd = c["dsd_transformer"].state_dict()
    base = {k: v for k, v in dsd.items() if not k.startswith("c_embedder.")}  # DSD = FLUX + c_embedder
    lora, lora_meta = lora_state_dict(c["dsd_transformer"], seed=seed + 6)
    extra, extra_meta = lora_state_dict(c["dsd_transformer"], seed=seed + 7)
    paths = {k: os.path.join(models_dir, v) for k, v in NATIVE_FILES.items()}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    t5 = {k: v.half() for k, v in c["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {"transformer": dsd, "base_transformer": base, "t5xxl": t5, "vae": c["vae"].state_dict(),
             "clip_l": {"text_model." + k: v for k, v in c["text_encoder"].state_dict().items()}}
    for key, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, paths[key], metadata={"format": "pt"})
    save_lora(paths["lora"], lora, lora_meta)
    save_lora(paths["extra_lora"], extra, extra_meta)
    c["tokenizer"].save_pretrained(os.path.join(paths["tokenizers"], "clip"))
    c["tokenizer_2"].save_pretrained(os.path.join(paths["tokenizers"], "t5"))
    return paths


def write_tiny_comfy_files(models_dir: str, seed: int = 0) -> dict[str, str]:
    """The tiny model set as the single files ComfyUI users keep, under a ComfyUI ``models`` folder.

    Same weights as :func:`write_tiny_model` with the same seed: the DSD transformer as one safetensors file
    (diffusers layout), the LoRA, ``clip_l`` and ``t5xxl_fp16`` (Hugging Face keys), the VAE (diffusers layout), and
    the tiny tokenizers in ``dsd/tokenizers/{clip,t5}`` (real ComfyUI installs have the real ones built in).
    """
    c = build_components(seed)
    lora, lora_meta = lora_state_dict(c["dsd_transformer"], seed=seed + 6)
    paths = {k: os.path.join(models_dir, v) for k, v in COMFY_FILES.items()}
    for key in ("transformer", "lora", "clip_l", "t5xxl", "vae"):
        os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
    t5 = {k: v.half() for k, v in c["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "transformer": c["dsd_transformer"].state_dict(),
        "clip_l": {"text_model." + k: v for k, v in c["text_encoder"].state_dict().items()},
        "t5xxl": t5,
        "vae": c["vae"].state_dict(),
    }
    for key, state in files.items():
        save_safetensors({k: v.contiguous() for k, v in state.items()}, paths[key], metadata={"format": "pt"})
    save_lora(paths["lora"], lora, lora_meta)
    c["tokenizer"].save_pretrained(os.path.join(paths["tokenizers"], "clip"))
    c["tokenizer_2"].save_pretrained(os.path.join(paths["tokenizers"], "t5"))
    return paths


def comfy_models_targets(models_dir: str) -> dict[str, str]:
    """What :func:`write_tiny_comfy_models` writes under ``models_dir``; InputError if any of it exists."""
    from .errors import InputError
    from .model_store import DEFAULT_BASE_NAME, DEFAULT_MODEL_NAME

    models_dir = os.path.abspath(models_dir)
    paths = {"model": os.path.join(models_dir, "dsd", DEFAULT_MODEL_NAME),
             "base": os.path.join(models_dir, "diffusers", DEFAULT_BASE_NAME),
             **{k: os.path.join(models_dir, v) for k, v in COMFY_FILES.items()}}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing:
        raise InputError(f"{', '.join(existing)} already exist(s); tiny-model never overwrites models (they may be "
                         f"real weights). Remove them or point --comfyui at another models folder.")
    return paths


def write_tiny_comfy_models(models_dir: str, seed: int = 0) -> dict[str, str]:
    """The tiny set laid out in a ComfyUI ``models`` folder, ready for every shipped workflow, in one step.

    Writes ``dsd/dsd_model`` (transformer/ + LoRA) and ``diffusers/FLUX.1-dev`` (for *DSD Model Loader*) and the single
    files of :data:`COMFY_FILES` with ``dsd/tokenizers`` (for *DSD Model Loader (ComfyUI files)*). Never overwrites: if
    any of these already exists (it may be a real model) nothing is written and :class:`InputError` says which.
    If ``models_dir`` sits in a ComfyUI folder with an ``input/`` folder, the reference image is copied there as
    ``dsd_reference.png`` (the workflows' input) unless one exists. Returns the paths written.
    """
    models_dir = os.path.abspath(models_dir)
    paths = comfy_models_targets(models_dir)
    os.makedirs(models_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".tiny-") as tmp:
        parts = write_tiny_model(os.path.join(tmp, "set"), seed=seed)
        for key in ("model", "base"):
            os.makedirs(os.path.dirname(paths[key]), exist_ok=True)
            os.replace(parts[key], paths[key])
        input_dir = os.path.join(os.path.dirname(models_dir), "input")
        if os.path.isdir(input_dir) and not os.path.exists(os.path.join(input_dir, "dsd_reference.png")):
            os.replace(parts["reference"], os.path.join(input_dir, "dsd_reference.png"))
            paths["reference"] = os.path.join(input_dir, "dsd_reference.png")
    write_tiny_comfy_files(models_dir, seed=seed)
    return paths


def write_tiny_model(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the tiny model set to ``out_dir`` (see module docstring); returns the paths of its parts.

    Files are written to a temporary folder next to ``out_dir`` and moved into place only when complete.
    """
    from diffusers import FluxPipeline

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder for the tiny model set.")
    c = build_components(seed)
    lora, lora_meta = lora_state_dict(c["dsd_transformer"], seed=seed + 6)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".tiny-") as tmp:
        base = os.path.join(tmp, "base")
        pipe = FluxPipeline(scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                            tokenizer=c["tokenizer"], text_encoder_2=c["text_encoder_2"],
                            tokenizer_2=c["tokenizer_2"], transformer=c["transformer"])
        pipe.save_pretrained(base)
        dsd = os.path.join(tmp, "dsd")
        c["dsd_transformer"].save_pretrained(os.path.join(dsd, "transformer"))
        save_lora(os.path.join(dsd, "pytorch_lora_weights.safetensors"), lora, lora_meta)
        reference_image(seed=seed).save(os.path.join(tmp, "reference.png"))
        with open(os.path.join(tmp, "README.txt"), "w", encoding="utf-8") as f:
            f.write("Tiny DSD model set with RANDOM weights, for tests and demos: its images are noise.\n"
                    "Made by `python -m dsd_core tiny-model`.\n" + json.dumps({"seed": seed}) + "\n")
        apply_umask(tmp)  # TemporaryDirectory is 0700 and safetensors files 0600: give them the user's umask
        if os.path.exists(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        os.makedirs(tmp)  # let TemporaryDirectory clean up an empty folder
    return dict(base=os.path.join(out_dir, "base"), model=os.path.join(out_dir, "dsd"),
                transformer=os.path.join(out_dir, "dsd", "transformer"),
                lora=os.path.join(out_dir, "dsd", "pytorch_lora_weights.safetensors"),
                reference=os.path.join(out_dir, "reference.png"))
