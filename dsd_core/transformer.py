"""The DSD transformer: FLUX plus one condition embedding layer.

DSD (Diffusion Self-Distillation, Cai et al., CVPR 2025) changes exactly one thing in the FLUX.1 transformer: the
VAE latents of the 1x2 condition canvas (reference on the left, black on the right), packed like the image latents,
go through an extra ``c_embedder = Linear(in_channels, inner_dim)`` whose output is *added* to the image-token
embedding::

    hidden = x_embedder(latents) + c_embedder(condition_latents)

Everything after that is stock FLUX. We therefore subclass diffusers' :class:`FluxTransformer2DModel` (so LoRA,
single-file loading, offload, gradient checkpointing and attention backends keep working) and add the condition
through a forward hook on ``x_embedder`` instead of copying FLUX's forward.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from .errors import ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

CONDITION_KEYS = ("c_embedder.weight", "c_embedder.bias")


class DSDTransformer2DModel(FluxTransformer2DModel):
    """FLUX transformer with the DSD condition embedding (``c_embedder``).

    Takes the same arguments as :class:`diffusers.FluxTransformer2DModel`; the extra layer is
    ``c_embedder = Linear(in_channels, num_attention_heads * attention_head_dim)`` (64 -> 3072 at full size),
    zero-initialised so that a freshly built model behaves like FLUX given a zero condition.

    ``forward`` takes every FLUX argument plus:

    condition_hidden_states (`torch.Tensor` of shape `(batch_size or 1, image_sequence_length, in_channels)`):
        Packed condition latents, in the same token order as ``hidden_states``. A batch of 1 is broadcast.
        Pass ``torch.zeros_like(cond)`` for the reference's unconditional pass. ``None`` adds nothing (plain
        FLUX behaviour, which is *not* the same as a zero condition because of the layer's bias).
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
    ):
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        self.c_embedder = nn.Linear(in_channels, self.inner_dim)
        nn.init.zeros_(self.c_embedder.weight)
        nn.init.zeros_(self.c_embedder.bias)
        self._condition: torch.Tensor | None = None
        self._condition_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hooked_embedder = 0
        self._hook_condition()

    def _hook_condition(self) -> None:
        """Attach the condition hook to the current ``x_embedder``.

        Quantizers (GGUF, bitsandbytes) replace ``x_embedder`` after construction; without re-attaching, the
        reference image would be silently ignored. Checked on every forward, so any replacement is covered.
        """
        if self._hooked_embedder != id(self.x_embedder):
            self.x_embedder.register_forward_hook(self._add_condition_embedding)
            self._hooked_embedder = id(self.x_embedder)

    # ------------------------------------------------------------------ condition
    def embed_condition(self, condition_hidden_states: torch.Tensor) -> torch.Tensor:
        """``c_embedder(condition)``; cached per condition tensor inside :meth:`condition_cache`."""
        cache = self._condition_cache
        if cache is None:
            return self.c_embedder(condition_hidden_states)
        c = condition_hidden_states
        for tensor, embedding in cache:  # the cache holds the tensors, so identity is a safe key
            if tensor is c:
                return embedding
        embedding = self.c_embedder(c)
        cache.append((c, embedding))
        return embedding

    @contextlib.contextmanager
    def condition_cache(self) -> Iterator[None]:
        """Within this context the condition embedding of a given tensor is computed once, not on every step.

        The cache lives inside the forward pass, so it works under accelerate offload hooks, and is dropped on exit.
        Condition tensors must not be modified in place inside the context (the pipeline never does).
        """
        outer = self._condition_cache
        self._condition_cache = [] if outer is None else outer
        try:
            yield
        finally:
            self._condition_cache = outer

    def _add_condition_embedding(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self._condition is None:
            return output
        return output + self.embed_condition(self._condition)

    def forward(self, hidden_states: torch.Tensor, *args, condition_hidden_states: torch.Tensor | None = None,
                **kwargs):
        if condition_hidden_states is not None:
            if condition_hidden_states.shape[-2:] != hidden_states.shape[-2:]:
                raise ValueError(
                    f"condition_hidden_states has shape {tuple(condition_hidden_states.shape)} but hidden_states has "
                    f"{tuple(hidden_states.shape)}; the condition must be packed like the latents (same tokens, same "
                    "channels)."
                )
            if condition_hidden_states.shape[0] not in (1, hidden_states.shape[0]):
                raise ValueError(
                    f"condition batch {condition_hidden_states.shape[0]} does not match latent batch "
                    f"{hidden_states.shape[0]}; pass a batch of 1 (broadcast) or one condition per latent."
                )
        self._hook_condition()
        self._condition = condition_hidden_states
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._condition = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, init_condition_embedder: bool = False, **kwargs):
        """Load a DSD transformer folder (``config.json`` + single or sharded safetensors).

        A folder without ``c_embedder`` weights (a plain FLUX transformer) is an error, because generating with
        an untrained condition layer silently ignores the reference image. Pass ``init_condition_embedder=True``
        to load a plain FLUX transformer on purpose with ``c_embedder`` set to zero (to start training DSD).
        """
        path = os.fspath(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(path, subfolder) if subfolder else path
        if os.path.isdir(folder):
            has_condition = folder_has_condition_weights(folder)
            if not has_condition and not init_condition_embedder:
                raise ModelFormatError(
                    f"{folder} holds a plain FLUX transformer (no c_embedder weights), not a DSD transformer. "
                    "Use the transformer/ folder of primecai/dsd_model, or pass init_condition_embedder=True "
                    "to start from FLUX with a zero condition layer (for training)."
                )
            if not has_condition:
                logger.warning("%s has no c_embedder weights; initialising the condition layer to zero.", folder)
                kwargs["low_cpu_mem_usage"] = False
                model = super().from_pretrained(path, *args, **kwargs)
                with torch.no_grad():
                    model.c_embedder.weight.zero_()
                    model.c_embedder.bias.zero_()
                return model
        model = super().from_pretrained(path, *args, **kwargs)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ModelFormatError(
                f"{folder} is missing {len(missing)} weights of the DSD transformer (e.g. {missing[0]}); the "
                "checkpoint does not match its config.json. Download the transformer/ folder again."
            )
        return model


def folder_has_condition_weights(folder: str) -> bool:
    """True if the safetensors in ``folder`` (single file or sharded with an index) contain ``c_embedder``.

    Reads only the headers / index, never the tensors.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ModelNotFoundError(
            f"{folder} has no config.json, so it is not a diffusers transformer folder. Point at the transformer/ "
            "folder of a DSD model (config.json + diffusion_pytorch_model*.safetensors)."
        )
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(folder, index[0]), encoding="utf-8") as f:
            keys = set(json.load(f).get("weight_map", {}))
        return all(k in keys for k in CONDITION_KEYS)
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        raise ModelNotFoundError(
            f"{folder} has a config.json but no .safetensors weights (only safetensors are loaded, never pickle "
            "files). Download the weights again or convert them to safetensors."
        )
    from safetensors import safe_open

    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            keys = set(f.keys())
        if all(k in keys for k in CONDITION_KEYS):
            return True
    return False
