"""A *bench* DSD model set for CPU benchmarks: the real token counts (512x1024 canvas = 2048 image tokens, 512 T5
tokens) through a narrow transformer (inner dim 256, 1 double + 2 single blocks) and the tiny VAE / text encoders
of :mod:`dsd_core.tiny`. Random weights: timings and ratios are meaningful, images are noise.
"""

from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BENCH_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=64, num_attention_heads=4,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
)
HEIGHT, WIDTH = 512, 1024


def bench_pipeline(seed: int = 0, dtype=torch.float32):
    """DSDPipeline with the bench transformer (random c_embedder and a rank-4 LoRA) on the CPU."""
    from dsd_core.pipeline import DSDPipeline
    from dsd_core.tiny import build_components, lora_state_dict
    from dsd_core.transformer import DSDTransformer2DModel

    c = build_components(seed)
    torch.manual_seed(seed + 10)
    dit = DSDTransformer2DModel(**BENCH_TRANSFORMER)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 11)
        dit.c_embedder.weight.copy_(torch.randn(dit.c_embedder.weight.shape, generator=g) * 0.2)
        dit.c_embedder.bias.copy_(torch.randn(dit.c_embedder.bias.shape, generator=g) * 0.02)
    dit.eval()
    pipe = DSDPipeline(scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                       tokenizer=c["tokenizer"], text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"],
                       transformer=dit).to(dtype=dtype)
    lora, meta = lora_state_dict(dit, rank=4, seed=seed + 12)
    pipe.load_lora_into_transformer({f"transformer.{k}": v for k, v in lora.items()}, network_alphas=None,
                                    transformer=pipe.transformer, adapter_name="dsd", _pipeline=pipe)
    assert getattr(pipe.transformer, "peft_config", None), "the bench LoRA did not load"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image():
    from dsd_core.image import prepare_reference
    from dsd_core.tiny import reference_image as make

    return prepare_reference(make(seed=5), HEIGHT, WIDTH // 2)


class TransformerTimer:
    """Wall time spent inside ``transformer.forward`` (CPU: synchronous, so wall time is compute time)."""

    def __init__(self, transformer):
        self.seconds = 0.0
        self.calls = 0
        self._t0 = None
        self._hooks = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _pre(self, *args):
        self._t0 = time.perf_counter()

    def _post(self, *args):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def remove(self):
        for h in self._hooks:
            h.remove()


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()
