"""Estimated peak GPU memory of DSD training at full size (FLUX.1-dev, 512x1024 canvas), from the memory model in
:mod:`dsd_core.memory.estimator` (parameter counts built on the meta device). Printed before training.

    encoding = every frozen weight (transformer in its storage format, T5 + CLIP, VAE) + T5 activations
               (once, before step 1: the text embeddings and VAE latents are cached)
    training = transformer + VAE (the text encoders wait in host memory after encoding)
             + trainable LoRA and c_embedder: fp32 weights + fp32 gradients + optimiser states
               (AdamW: 2 x fp32; 8-bit AdamW: 2 x 1 byte; Adafactor ~ 1 x fp32 factored; SGD: none)
             + activations: with gradient checkpointing, one block input per block kept for the backward pass plus
               one block's full activations (x3 for its backward); without it, every block's
    peak = max(encoding, training) + CUDA context

An estimate, not a measurement: allocator fragmentation typically adds 5-15 %.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 4.0, "sgd": 0.0}


@dataclass
class TrainingEstimate:
    frozen_gib: float
    trainable_gib: float
    activations_gib: float
    peak_gib: float
    trainable_params: int
    notes: str
    encoding_gib: float = 0.0  # phase 1: caching latents and text embeddings
    training_gib: float = 0.0  # phase 2: the training steps

    def summary(self) -> str:
        return (f"estimated peak GPU memory at full size (FLUX.1-dev, {self.notes}): ~{self.peak_gib:.1f} GiB "
                f"(caching {self.encoding_gib:.1f}; training {self.training_gib:.1f} = transformer+VAE "
                f"{self.frozen_gib:.1f} + trainable/optimiser {self.trainable_gib:.1f} + activations "
                f"{self.activations_gib:.1f}); an estimate, not a measurement")


def estimate_dsd_training(config, options) -> TrainingEstimate:
    from ..memory.config import resolve_memory
    from ..memory.estimator import (CUDA_CONTEXT_GIB, component_sizes, denoise_activation_bytes, lora_params,
                                    text_activation_bytes, vae_activation_bytes)

    memory = resolve_memory(config.memory)
    storage = {k: v for k, v in (("transformer_weights", config.base_weights),
                                 ("text_encoder_weights", config.text_encoder_weights)) if v}
    memory = memory.replace(**storage) if storage else memory
    sizes = component_sizes()
    fmt = {"native": "bf16"}.get(memory.transformer_weights, memory.transformer_weights)
    if fmt == "gguf":
        fmt = "gguf-Q4_K"
    transformer = sizes["transformer"].weight_bytes(fmt)
    text_fmt = "fp8" if memory.text_encoder_weights == "fp8" else "bf16"
    text = sum(sizes[n].weight_bytes(text_fmt) for n in sizes if n not in ("transformer", "vae"))
    vae = sizes["vae"].weight_bytes("bf16")
    targets = tuple(options.targets())
    n_train = lora_params(options.rank, targets) + (64 * 3072 + 3072 if options.train_c_embedder else 0)
    trainable = n_train * (4 + 4 + OPTIMIZER_BYTES.get(config.optimizer, 8.0))
    panel = config.panel_size
    image_tokens = (panel // 16) * (2 * panel // 16)
    tokens = image_tokens + options.max_sequence_length
    per_block = denoise_activation_bytes(config.batch_size, image_tokens, options.max_sequence_length)
    blocks = sizes["transformer"].blocks
    if config.gradient_checkpointing:
        act = blocks * config.batch_size * tokens * 3072 * 2 + 3 * per_block
    else:
        act = blocks * per_block
    encoding = transformer + text + vae + text_activation_bytes() + vae_activation_bytes(panel, 2 * panel)
    training = transformer + vae + trainable + act
    peak = max(encoding, training) / GIB + CUDA_CONTEXT_GIB
    notes = (f"{memory.transformer_weights} transformer, rank {options.rank}, batch {config.batch_size}, "
             f"{panel}x{2 * panel}, {config.optimizer}, gradient checkpointing "
             f"{'on' if config.gradient_checkpointing else 'off'}")
    return TrainingEstimate((transformer + vae) / GIB, trainable / GIB, act / GIB, peak, n_train, notes,
                            encoding / GIB + CUDA_CONTEXT_GIB, training / GIB + CUDA_CONTEXT_GIB)
