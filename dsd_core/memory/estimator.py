"""The memory model of full-size DSD: resident weights per component and storage format, activations, peak VRAM per
memory preset, host RAM and PCIe traffic. The parameter counts of each component come from building it on the meta
device from the shipped configs (``dsd_core/configs``; no weights needed); they are shipped as
``dsd_core/configs/component_sizes.json`` (checked against a fresh meta build by the tests), so the estimates import
neither torch nor diffusers and take milliseconds.

Peak VRAM of a run = the largest of its phases, plus the CUDA context::

    peak = max(encode_text, encode_image, denoise, decode) + CUDA_CONTEXT_GIB
    phase = weights resident on the GPU during the phase + activations of the phase (+ one dequantized layer)

Which weights are resident in a phase depends on the offload mode:

* ``none``: every component (the text encoders drop out after encoding with ``release_text_encoders``);
* ``model`` (accelerate model offload as DSDPipeline uses it): T5 while encoding text; T5 + VAE while encoding the
  reference (the chain offloads the previous model only when the next one starts); the transformer + LoRA alone while
  denoising (the pipeline sends the others back to the CPU first); the VAE alone while decoding;
* ``group``: the transformer's non-block layers + ``group_offload_blocks`` of its largest block, twice with CUDA
  streams (the next group is prefetched); text encoders and VAE layer by layer (largest layer, twice with streams);
* ``sequential``: the largest single layer of the active component.

Activations (inference, no autograd), for ``B`` sequences of ``N = 2048 + 512`` tokens of width ``D = 3072``::

    denoise = ACTIVATION_FACTOR * B * N * D * bytes            (+ B * heads * N^2 * (bytes + 4) with math attention)
    ACTIVATION_FACTOR = 18: the live tensors at the peak of a single-stream block (input, norm output, q/k/v,
    fp32 rotary and RMS-norm temporaries, 4D MLP hidden, attention output, the 5D concatenation before proj_out);
    flash/memory-efficient SDPA keeps no N x N scores. Measured 17.2 (single block) and 12.8 (double block) with
    torch's memory profiler on the CPU, bf16, D = 3072, N = 2560 (``benchmarks/memory_model.py --measure``);
    rounded up. B = images per run, x3 with batched true guidance. At 2560 tokens, bf16, B = 1: 0.26 GiB.
    encode_text (T5-XXL, L = 512 tokens) = heads * L^2 * 12 + L * d_ff * 6 bytes    (scores, bias, softmax; FFN)
    VAE encode/decode at H x W = VAE_ACTIVATION_CHANNELS * H * W * bytes * images  (~1 GiB at 512 x 1024)
    quantized or fp8 weights add one layer dequantized to the compute dtype (the largest linear: 94 MiB).

The weights columns follow ``shared/docs/offline-testing.md`` section 4: only ``nn.Linear`` weights are quantized, the
rest stays bf16; NF4 carries one fp32 absmax per 64 weights, torchao int4 a bf16 scale and zero per 64, GGUF its block
scales (bytes per block / weights per block). Our ``fp8`` mode keeps a few small layers in bf16
(:data:`dsd_core.memory.apply.FP8_KEEP_TRANSFORMER`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field

from .config import PRESETS, MemoryConfig, check_memory

GIB = 2**30
#: CUDA context + cuBLAS workspace, not counted by ``torch.cuda.max_memory_allocated`` (typically 0.3-0.6 GiB).
CUDA_CONTEXT_GIB = 0.4
#: Live activation tensors of width D per token at the peak of a FLUX block (see module docstring; measured 17.2).
ACTIVATION_FACTOR = 18
#: Channel-equivalents alive at full resolution at the peak of the FLUX VAE (256-channel upsample in and out,
#: 128-channel resnet tensors, norm/activation temporaries).
VAE_ACTIVATION_CHANNELS = 1024
#: ``pytorch_lora_weights.safetensors`` of primecai/dsd_model is 418 MB (shared/docs/dsd-reference.md section 3;
#: rank and targets unverified; as bf16 that is ~209 M parameters, i.e. ~rank 128 on the attention projections).
DSD_LORA_FILE_BYTES = 418_000_000
#: Effective host-to-GPU bandwidth assumed for transfer times (PCIe 4.0 x16).
PCIE_BYTES_PER_S = 25e9
#: Python + torch + diffusers in host memory, before any weights.
HOST_BASELINE_GIB = 1.5
#: The DSD transformer file (bf16 diffusers safetensors; field-survey section 0).
DSD_TRANSFORMER_FILE_GB = 23.8

#: Bytes per quantized ``nn.Linear`` weight element.
LINEAR_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "fp8-linear": 1.0, "int8": 1.0,
                "int4": 0.5 + 4 / 64, "nf4": 0.5 + 4 / 64}
#: GGUF (weights per block, bytes per block), as in ``gguf.GGML_QUANT_SIZES``.
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176), "Q5_1": (32, 24), "Q5_0": (32, 22),
               "Q4_K": (256, 144), "Q4_1": (32, 20), "Q4_0": (32, 18), "Q3_K": (256, 110), "Q2_K": (256, 84),
               "BF16": (1, 2), "F16": (1, 2)}
#: The GGUF type assumed when the file name does not tell (the common "fits 8 GB" community quant).
DEFAULT_GGUF_TYPE = "Q4_K"
#: LoRA targets used for :func:`lora_params` (the attention projections; see dsd_core.tiny.LORA_TARGETS).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


# ---------------------------------------------------------------------------------------------- components
@dataclass(frozen=True)
class ComponentSize:
    """Parameter counts of one full-size component, from a meta-device build."""

    name: str
    params: int
    linear_params: int  # weights of all nn.Linear layers
    fp8_params: int  # the nn.Linear weights our fp8 mode stores in fp8
    largest_linear: int  # elements of the largest nn.Linear weight
    largest_block: int  # params of the largest repeated block (0 if none)
    non_block: int  # params outside the repeated blocks
    largest_leaf: int  # params of the largest module holding parameters directly
    blocks: int = 0

    def weight_bytes(self, fmt: str) -> float:
        """Bytes of the weights stored as ``fmt`` (bf16, fp16, fp32, fp8, fp8-linear, int8, int4, nf4, gguf-<TYPE>)."""
        if fmt in ("bf16", "fp16", "native"):
            return self.params * 2.0
        if fmt == "fp32":
            return self.params * 4.0
        if fmt == "fp8":
            return self.fp8_params + (self.params - self.fp8_params) * 2.0
        if fmt.startswith("gguf-"):
            n, b = GGUF_BLOCKS[fmt[5:].upper()]
            rate = b / n
        elif fmt in LINEAR_BYTES:
            rate = LINEAR_BYTES[fmt]
        else:
            raise ValueError(f"unknown weight format {fmt!r}")
        return self.linear_params * rate + (self.params - self.linear_params) * 2.0

    def gib(self, fmt: str) -> float:
        return self.weight_bytes(fmt) / GIB


def _block_lists(name: str, model) -> list:
    if name == "transformer":
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)
    if name == "t5":
        return list(model.encoder.block)
    if name == "clip":  # transformers 5: CLIPTextModel holds the layers directly (4.x: under .text_model)
        text = getattr(model, "text_model", model)
        return list(text.encoder.layers)
    return []


def _measure(name: str, model, fp8_keep: tuple[str, ...]) -> ComponentSize:
    import torch

    from .apply import is_kept

    params = sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linear = sum(m.weight.numel() for _, m in linears)
    fp8 = sum(m.weight.numel() for n, m in linears if not is_kept(n, fp8_keep))
    blocks = _block_lists(name, model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    leaves = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ComponentSize(name=name, params=params, linear_params=linear, fp8_params=fp8,
                         largest_linear=max((m.weight.numel() for _, m in linears), default=0),
                         largest_block=max(block_params, default=0), non_block=params - sum(block_params),
                         largest_leaf=max(leaves), blocks=len(blocks))


def _config(name: str) -> dict:
    from ..single_file.configs import shipped_config

    return shipped_config(name)


@functools.lru_cache(maxsize=1)
def full_size_models() -> dict:
    """The full-size transformer, T5-XXL encoder, CLIP-L text model and FLUX VAE on the meta device."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..transformer import DSDTransformer2DModel

    # torch.device("meta") (not accelerate.init_empty_weights) so that T5's shared/embed_tokens are tied.
    with torch.device("meta"):
        return {
            "transformer": DSDTransformer2DModel(**_config("transformer")),
            "t5": T5EncoderModel(T5Config(**_config("t5"))),
            "clip": CLIPTextModel(CLIPTextConfig(**_config("clip"))),
            "vae": AutoencoderKL(**_config("vae")),
        }


#: The shipped :func:`measure_component_sizes` (regenerate with :func:`write_component_sizes` when a config or the
#: fp8 keep lists change; ``tests/test_memory_model.py`` checks it).
SIZES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "component_sizes.json")


def measure_component_sizes() -> dict[str, ComponentSize]:
    """:class:`ComponentSize` of the full-size transformer, T5-XXL, CLIP-L and VAE, measured on the meta device."""
    from .apply import FP8_KEEP_TEXT, FP8_KEEP_TRANSFORMER

    models = full_size_models()
    return {name: _measure(name, m, FP8_KEEP_TRANSFORMER if name == "transformer" else FP8_KEEP_TEXT)
            for name, m in models.items()}


def write_component_sizes(path: str = SIZES_FILE) -> str:
    sizes = {name: dataclasses.asdict(s) for name, s in measure_component_sizes().items()}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=1)
def component_sizes() -> dict[str, ComponentSize]:
    """:class:`ComponentSize` of the transformer, T5-XXL, CLIP-L and the VAE (full size), from the shipped file."""
    with open(SIZES_FILE, encoding="utf-8") as f:
        return {name: ComponentSize(**values) for name, values in json.load(f).items()}


def lora_params(rank: int, targets=ATTENTION_TARGETS) -> int:
    """Parameters of a rank-``rank`` LoRA on the full-size transformer's ``targets`` (attention projections)."""
    import torch

    model = full_size_models()["transformer"]
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
            total += rank * (m.in_features + m.out_features)
    return total


# ---------------------------------------------------------------------------------------------- activations
def denoise_activation_bytes(batch: int = 1, image_tokens: int = 2048, text_tokens: int = 512, width: int = 3072,
                             heads: int = 24, bytes_per: int = 2, attention: str = "sdpa") -> float:
    n = image_tokens + text_tokens
    act = ACTIVATION_FACTOR * batch * n * width * bytes_per
    if attention == "math":
        act += batch * heads * n * n * (bytes_per + 4)
    return float(act)


def text_activation_bytes(tokens: int = 512, heads: int = 64, d_ff: int = 10240) -> float:
    return float(heads * tokens * tokens * 12 + tokens * d_ff * 6)


def vae_activation_bytes(height: int = 512, width: int = 1024, images: int = 1, bytes_per: int = 2) -> float:
    return float(VAE_ACTIVATION_CHANNELS * height * width * bytes_per * images)


# ---------------------------------------------------------------------------------------------- estimate
@dataclass
class MemoryEstimate:
    """Estimated memory of one DSD run (GiB)."""

    config: MemoryConfig
    weights: dict[str, float]  # storage size per component (GiB), "lora" included
    phases: dict[str, float]  # VRAM per phase, without the CUDA context
    activations: float  # denoising activations
    peak: float  # max(phases) + CUDA context
    host_ram: float
    transfer_gib: float  # host -> GPU traffic per image
    formats: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak

    @property
    def transfer_seconds(self) -> float:
        return self.transfer_gib * GIB / PCIE_BYTES_PER_S

    def summary(self) -> str:
        name = self.config.preset or "custom"
        return (f"{name}: ~{self.peak:.1f} GiB VRAM at peak ({max(self.phases, key=self.phases.get)}), "
                f"~{self.host_ram:.0f} GiB host RAM, {self.transfer_gib:.0f} GiB host->GPU per image")


def _gguf_type(cfg: MemoryConfig, default: str) -> str:
    if cfg.gguf_file:
        m = re.search(r"(Q\d_(?:K|0|1)|BF16|F16)", os.path.basename(cfg.gguf_file).upper())
        if m and m.group(1) in GGUF_BLOCKS:
            return m.group(1)
    return default


def estimate(memory=None, *, height: int = 512, width: int = 1024, num_images: int = 1,
             num_inference_steps: int = 28, true_guidance: bool = False, batch_true_guidance: bool = False,
             attention: str = "sdpa", gguf_type: str = DEFAULT_GGUF_TYPE,
             lora_bytes: float = DSD_LORA_FILE_BYTES) -> MemoryEstimate:
    """Estimate VRAM, host RAM and transfers of full-size DSD on a CUDA GPU, bf16 compute, for ``memory``
    (a :class:`MemoryConfig`, or ``None``: no savings). See the module docstring for the formulas."""
    cfg = check_memory(memory)
    sizes = component_sizes()
    tr, t5, clip, vae = (sizes[k] for k in ("transformer", "t5", "clip", "vae"))
    bytes_per = 2  # bf16 compute

    tw = cfg.transformer_weights
    t_fmt = {"native": "bf16", "gguf": f"gguf-{_gguf_type(cfg, gguf_type)}"}.get(tw, tw)
    te_fmt = "fp8" if cfg.text_encoder_weights == "fp8" else "bf16"
    w = {"transformer": tr.weight_bytes(t_fmt), "lora": 0.0 if cfg.fuse_lora else float(lora_bytes),
         "t5": t5.weight_bytes(te_fmt), "clip": clip.weight_bytes(te_fmt), "vae": vae.weight_bytes("bf16")}
    lossy = t_fmt != "bf16"
    transient = tr.largest_linear * bytes_per if lossy else 0.0
    te_transient = t5.largest_linear * bytes_per if te_fmt != "bf16" else 0.0

    tokens = (height // 16) * (width // 16)
    batch = num_images * (3 if true_guidance and batch_true_guidance else 1)
    act = denoise_activation_bytes(batch, tokens, 512, attention=attention)
    act_text = text_activation_bytes()
    act_vae = vae_activation_bytes(height, width, num_images)

    streams = cfg.group_offload_streams is not False  # CUDA: on unless turned off
    copies = 2 if streams else 1
    off = cfg.offload
    notes = []
    if off == "none":
        allw = sum(w.values())
        after = allw - (w["t5"] + w["clip"] if cfg.release_text_encoders else 0.0)
        phases = {"encode_text": allw + act_text + te_transient, "encode_image": after + act_vae,
                  "denoise": after + act + transient, "decode": after + act_vae}
    elif off == "model":
        phases = {"encode_text": w["t5"] + act_text + te_transient, "encode_image": w["t5"] + w["vae"] + act_vae,
                  "denoise": w["transformer"] + w["lora"] + act + transient, "decode": w["vae"] + act_vae}
    elif off == "group":
        scale = w["transformer"] / (tr.params * 2.0)  # storage bytes per bf16 byte
        lora_per_block = w["lora"] / max(tr.blocks, 1)
        group = (tr.largest_block * 2.0 * scale + lora_per_block) * cfg.group_offload_blocks * copies
        phases = {"encode_text": t5.largest_leaf * 2.0 * copies + act_text + te_transient,
                  "encode_image": vae.largest_leaf * 2.0 * copies + act_vae,
                  "denoise": tr.non_block * 2.0 + group + act + transient,
                  "decode": vae.largest_leaf * 2.0 * copies + act_vae}
    else:  # sequential
        phases = {"encode_text": t5.largest_leaf * 2.0 + act_text, "encode_image": vae.largest_leaf * 2.0 + act_vae,
                  "denoise": tr.largest_leaf * 2.0 + act + transient, "decode": vae.largest_leaf * 2.0 + act_vae}
        notes.append("sequential offload moves every layer on every pass and cannot prefetch; prefer 'group'")
    phases = {k: v / GIB for k, v in phases.items()}
    peak = max(phases.values()) + CUDA_CONTEXT_GIB

    weights_gib = {k: v / GIB for k, v in w.items()}
    kept_text = 0.0 if cfg.release_text_encoders else weights_gib["t5"] + weights_gib["clip"]
    host_weights = 0.0 if off == "none" else (sum(weights_gib.values()) - weights_gib["t5"] - weights_gib["clip"]
                                              + kept_text)
    passes = num_inference_steps if not true_guidance or batch_true_guidance else 3 * num_inference_steps - 4
    if off == "none":
        transfer = 0.0
    elif off == "model":
        transfer = sum(weights_gib.values()) + weights_gib["vae"]
    else:
        transfer = (weights_gib["transformer"] + weights_gib["lora"]) * passes + weights_gib["t5"] + \
            weights_gib["clip"] + 2 * weights_gib["vae"]
    if tw == "nf4":
        notes.append("NF4 needs CUDA + bitsandbytes; a GGUF Q4 quant gives the same size")
    return MemoryEstimate(config=cfg, weights=weights_gib, phases=phases, activations=act / GIB, peak=peak,
                          host_ram=HOST_BASELINE_GIB + host_weights, transfer_gib=transfer,
                          formats={"transformer": t_fmt, "text_encoders": te_fmt}, notes=notes)


# ---------------------------------------------------------------------------------------------- tables
_SPEED = {
    "full": "fastest (reference)",
    "24gb": "+ moving the weights once per image",
    "16gb": "+ transfers, + per-layer fp8 upcast (~5-10 %/step)",
    "12gb": "as 16gb; fused LoRA saves its matmuls",
    "8gb": "+ transfers, + NF4 dequant (~0-30 %/step)",
    "lowest": "PCIe-bound: transformer streamed every pass (~3-6x slower)",
}


def _files(cfg: MemoryConfig, sizes: dict[str, ComponentSize], gguf_type: str) -> str:
    base_gb = (sizes["t5"].weight_bytes("bf16") + sizes["clip"].weight_bytes("bf16")
               + sizes["vae"].weight_bytes("bf16")) / 1e9
    lora_gb = DSD_LORA_FILE_BYTES / 1e9
    if cfg.transformer_weights == "gguf":
        gtype = _gguf_type(cfg, gguf_type)
        t = f"DSD GGUF {gtype} ({sizes['transformer'].weight_bytes('gguf-' + gtype) / 1e9:.1f} GB, `pip install gguf`)"
    else:
        t = f"DSD transformer ({DSD_TRANSFORMER_FILE_GB:.1f} GB)"
        if cfg.transformer_weights == "nf4":
            t += " (quantized on load; CUDA + `pip install bitsandbytes`)"
        elif cfg.transformer_weights in ("int8", "int4"):
            t += " (quantized on load; `pip install torchao`)"
    return f"base {base_gb:.1f} GB + {t} + LoRA ({lora_gb:.2f} GB)"


def preset_table(presets=None, **kwargs) -> str:
    """Markdown table: preset -> estimated peak VRAM, host RAM, transfers, speed cost, files needed."""
    names = list(presets or [*PRESETS, MemoryConfig.from_preset("8gb", gguf_file=f"dsd-{DEFAULT_GGUF_TYPE}.gguf")])
    sizes = component_sizes()
    rows = ["| preset | transformer weights | offload | est. peak VRAM | host RAM | host->GPU per image | speed cost "
            "| files needed |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        cfg = MemoryConfig.from_preset(name) if isinstance(name, str) else check_memory(name)
        e = estimate(cfg, **kwargs)
        label = cfg.preset or "custom"
        weights = e.formats["transformer"] + (" + LoRA fused" if cfg.fuse_lora else "")
        speed = _SPEED.get(label, "")
        if cfg.transformer_weights == "gguf":
            label += f" with {e.formats['transformer'].replace('gguf-', 'GGUF ')}"
            speed = "+ transfers, + GGUF dequant (~30-100 %/step)"
        if e.formats["text_encoders"] != "bf16":
            weights += f", text {e.formats['text_encoders']}"
        transfer = "-" if e.transfer_gib == 0 else f"{e.transfer_gib:.0f} GiB (~{e.transfer_seconds:.0f} s)"
        rows.append(f"| {label} | {weights} | {cfg.offload} | **{e.peak:.1f} GiB** | {e.host_ram:.0f} GiB | "
                    f"{transfer} | {speed} | {_files(cfg, sizes, kwargs.get('gguf_type', DEFAULT_GGUF_TYPE))} |")
    return "\n".join(rows)


def component_table(formats=("bf16", "fp8-linear", "fp8", "int8", "nf4", "gguf-Q8_0", "gguf-Q4_K", "fp32")) -> str:
    """Markdown table: component -> parameters and GiB per storage format (cf. offline-testing.md section 4)."""
    sizes = component_sizes()
    head = "| component | params | " + " | ".join(f"{f} GiB" for f in formats) + " |"
    rows = [head, "|---|---|" + "---|" * len(formats)]
    total = {f: 0.0 for f in formats}
    for name, label in (("transformer", "DSD transformer (FLUX.1-dev + c_embedder)"), ("t5", "T5-XXL encoder"),
                        ("clip", "CLIP-L text"), ("vae", "FLUX VAE")):
        s = sizes[name]
        cells = []
        for f in formats:
            g = s.gib(f)
            total[f] += g
            cells.append(f"{g:.2f}")
        rows.append(f"| {label} | {s.params:,} | " + " | ".join(cells) + " |")
    rows.append(f"| DSD LoRA (file) | ~{DSD_LORA_FILE_BYTES // 2:,} (bf16) | "
                + " | ".join(f"{DSD_LORA_FILE_BYTES / GIB:.2f}" for _ in formats) + " |")
    params = sum(s.params for s in sizes.values())
    rows.append(f"| **total (no LoRA)** | {params:,} | " + " | ".join(f"**{total[f]:.2f}**" for f in formats) + " |")
    return "\n".join(rows)
