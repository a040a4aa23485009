"""DSD training: ``c_embedder`` (fully) and a transformer LoRA, on 1x2 canvases of paired images.

The objective follows the paper (Cai et al., CVPR 2025, "parallel processing") and generation exactly:

* **Sample.** The canvas is ``[reference | target]`` (each a ``panel x panel`` square, fitted like generation fits
  the reference: centre crop). It is VAE-encoded in one call; ``x0 = (z - shift) * scale`` is a posterior sample.
* **Condition.** The condition canvas ``[reference | black]`` goes through the same VAE, shift/scale and 2x2 packing
  as :meth:`dsd_core.DSDPipeline.prepare_condition` (a posterior sample by default, ``condition_sampling``), and into
  the transformer's ``condition_hidden_states`` (``c_embedder``) -- ``tests/test_training.py`` checks it equals what
  generation computes for the same seed.
* **Flow matching over both halves.** ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, MSE over every token of
  the canvas: the left half learns to reconstruct the reference, the right half the target (``loss_region=target``
  restricts it to the right half, a deviation from the paper).
* **Dropout for true guidance.** With probability ``condition_dropout`` the condition is zeroed (generation's
  unconditional branch feeds ``zeros_like(cond)``), and independently with ``caption_dropout`` the caption is
  replaced by the empty prompt, so DSD's two-scale true guidance has both contrasts to work with.
* **Timesteps.** ``timestep_sampling="flux_shift"`` (default): ``s = sigmoid(n)`` with ``n ~ N(0, 1)``
  (logit-normal), then the resolution-dependent shift generation uses for this canvas
  (``exp(mu) / (exp(mu) + 1/s - 1)``, ``mu`` from the token count: 0.80 at 512x1024) -- kohya's ``flux_shift`` /
  SimpleTuner's auto-shift, so training sees the noise levels sampling visits. Also: ``logit_normal`` (diffusers'
  default, no shift), ``sigmoid`` (``sigmoid(sigmoid_scale * n)``), ``shift`` (a fixed ``timestep_shift``, kohya
  ``discrete_flow_shift``), ``uniform``.
* **Distilled guidance input.** FLUX.1-dev takes a guidance value; ``guidance_mode=constant`` feeds
  ``guidance_value`` (default 1.0, as SimpleTuner -- DSD's own trainer -- and kohya do: it keeps the dev model's
  guidance distillation; DSD still samples at 3.5), ``random-range`` draws it uniformly from
  ``[guidance_min, guidance_max]`` per sample.

Trainable: ``c_embedder`` (weight and bias, float32) and a peft LoRA (``rank``, ``alpha``, ``lora_targets``). From
FLUX (``from_flux``) the LoRA is new (Gaussian A, zero B) and ``c_embedder`` starts at zero; from a DSD model
(``model``) the model's own LoRA is the starting adapter and its ``c_embedder`` the starting point.

The exported model folder (``OUTPUT/``) holds ``pytorch_lora_weights.safetensors`` (diffusers key layout, adapter
config with alpha in the metadata: ``load_lora_weights`` loads it) and ``transformer/``: a *linked* transformer
folder -- ``config.json``, the trained ``c_embedder`` in ``c_embedder.safetensors`` and ``dsd_link.json`` naming the
base transformer folder whose other weights are used unchanged (no 24 GB copy). ``export_full_transformer`` writes
a self-contained transformer folder instead.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from ...errors import DSDError, InputError
from ..config import _f
from .base import TrainingMethod

logger = logging.getLogger(__name__)

ADAPTER = "dsd"
#: LoRA target presets (module-name suffixes of the diffusers FLUX transformer).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGET_PRESETS = {
    "attention": ATTENTION,
    "attention+ffn": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                  "proj_mlp", "proj_out"],
}
TIMESTEP_SAMPLING = ("flux_shift", "logit_normal", "sigmoid", "shift", "uniform")
GUIDANCE_MODES = ("constant", "random-range")
LOSS_REGIONS = ("both", "target")


@dataclass
class DSDLoRAOptions:
    """DSD method: LoRA, c_embedder and the objective."""

    rank: int = _f(32, "LoRA rank (paper: 512 on 8x H100; 32 fits a 24 GB GPU with fp8 weights)")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / rank); stored in the LoRA file's metadata")
    lora_targets: str = _f("attention", "LoRA target modules: a preset (" + ", ".join(LORA_TARGET_PRESETS)
                           + ") or a comma-separated list of module-name suffixes")
    train_c_embedder: bool = _f(True, "train the condition layer c_embedder fully (DSD: yes)")
    c_embedder_lr: float = _f(0.0, "learning rate of c_embedder (0: the same as --lr)")
    condition_dropout: float = _f(0.1, "probability of a zero condition (teaches the unconditional branch of true "
                                       "image guidance)")
    caption_dropout: float = _f(0.1, "probability of the empty caption (teaches true text guidance's contrast)")
    condition_sampling: str = _f("sample", "condition latents: sample (a VAE posterior sample, as generation) or "
                                           "mode (the posterior mean)", ("sample", "mode"))
    timestep_sampling: str = _f("flux_shift", "how noise levels are drawn (see the module docs)", TIMESTEP_SAMPLING)
    sigmoid_scale: float = _f(1.0, "scale of the normal draw for sigmoid / logit-normal sampling")
    logit_mean: float = _f(0.0, "mean of the logit-normal draw")
    timestep_shift: float = _f(3.0, "fixed shift for timestep_sampling=shift")
    guidance_mode: str = _f("constant", "distilled-guidance input while training", GUIDANCE_MODES)
    guidance_value: float = _f(1.0, "guidance for guidance_mode=constant (SimpleTuner / kohya: 1.0)")
    guidance_min: float = _f(1.0, "lower bound for guidance_mode=random-range")
    guidance_max: float = _f(4.0, "upper bound for guidance_mode=random-range")
    loss_region: str = _f("both", "both: flow matching over the whole canvas (paper); target: right half only",
                          LOSS_REGIONS)
    max_sequence_length: int = _f(512, "T5 tokens of the caption (generation: 512)")
    validation_seed: int = _f(0, "seed of the validation images")
    validation_guidance: float = _f(3.5, "distilled guidance of the validation images (DSD: 3.5)")
    export_full_transformer: bool = _f(False, "write a self-contained transformer/ (24 GB at full size) instead of "
                                              "c_embedder + a link to the base transformer")

    def __post_init__(self):
        from ..config import check_choices

        check_choices(self)
        if self.rank < 1:
            raise InputError(f"rank must be at least 1, got {self.rank}.")
        for name in ("condition_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1, got {getattr(self, name)}.")

    def targets(self) -> list[str]:
        if self.lora_targets in LORA_TARGET_PRESETS:
            return list(LORA_TARGET_PRESETS[self.lora_targets])
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


class DSDLoRAMethod(TrainingMethod):
    """DSD: LoRA + ``c_embedder`` on 1x2 canvases (see the module docstring)."""

    name = "dsd-lora"
    Options = DSDLoRAOptions

    # ------------------------------------------------------------------ models
    def load(self, device, dtype) -> None:
        from peft import LoraConfig

        from ...loading import load_pipeline
        from ...memory.config import resolve_memory

        c, o = self.config, self.options
        if bool(c.model) == bool(c.from_flux):
            raise InputError("pass exactly one starting point: --model DSD_DIR (continue from DSD weights) or "
                             "--from-flux FLUX_TRANSFORMER_DIR (fresh c_embedder and LoRA).")
        memory = resolve_memory(c.memory)
        storage = {k: v for k, v in (("transformer_weights", c.base_weights),
                                     ("text_encoder_weights", c.text_encoder_weights)) if v}
        memory = memory.replace(**storage) if storage else memory
        if memory.offload != "none" or memory.fuse_lora or memory.release_text_encoders:
            memory = memory.replace(offload="none", fuse_lora=False, release_text_encoders=False)
            logger.warning("training keeps the model on the device with an unfused LoRA; the memory preset's "
                           "offload / LoRA fusing / encoder release are not used (weight storage is).")
        common = dict(base=c.base, dtype=dtype, device=str(device), memory=memory,
                      local_files_only=c.local_files_only)
        if c.from_flux:
            self.source_transformer = os.path.abspath(os.path.expanduser(c.from_flux))
            pipe = load_pipeline(model=None, transformer=self.source_transformer, lora=False,
                                 init_condition_embedder=True, **common)
        else:
            pipe = load_pipeline(model=c.model, **common)
            from ...loading import resolve_model

            self.source_transformer = os.path.abspath(resolve_model(c.model, None, False)[0])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        transformer = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, transformer):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        if c.from_flux:
            lora = LoraConfig(r=o.rank, lora_alpha=o.alpha, init_lora_weights="gaussian",
                              target_modules=o.targets())
            transformer.add_adapter(lora, adapter_name=ADAPTER)
        else:
            adapters = list(getattr(transformer, "peft_config", {}) or {})
            if ADAPTER not in adapters:
                raise DSDError(f"the DSD model {c.model} loaded no LoRA adapter; it needs "
                               "pytorch_lora_weights.safetensors to continue training from it.")
            lc = transformer.peft_config[ADAPTER]
            if (lc.r, lc.lora_alpha) != (o.rank, o.alpha):
                logger.warning("continuing the model's own LoRA (rank %s, alpha %s); --rank/--alpha are ignored.",
                               lc.r, lc.lora_alpha)
        transformer.set_adapter(ADAPTER)
        for name, p in transformer.named_parameters():
            if "lora_" in name and f".{ADAPTER}." in name:
                p.requires_grad_(True)
        if type(transformer.c_embedder.weight.data) is not torch.Tensor:
            raise DSDError(f"base_weights={memory.transformer_weights!r} quantizes c_embedder too, which DSD trains; "
                           "use base_weights native or fp8 (fp8 keeps c_embedder and the LoRA in full precision).")
        transformer.c_embedder.requires_grad_(o.train_c_embedder)
        for p in transformer.parameters():  # trainable weights in float32 (the frozen base keeps its dtype)
            if p.requires_grad:
                p.data = p.data.float()
        self.transformer = transformer
        self.device = torch.device(device)
        self.dtype = dtype
        with torch.no_grad():
            empty, empty_pooled, _ = pipe.encode_text("", self.device, o.max_sequence_length)
        self.empty_embeds, self.empty_pooled = empty.cpu(), empty_pooled.cpu()

    def trainable_module(self):
        return self.transformer

    def trainable_parameters(self) -> list:
        o = self.options
        lora = [p for n, p in self.transformer.named_parameters() if p.requires_grad and "lora_" in n]
        groups = [{"params": lora}]
        if o.train_c_embedder:
            groups.append({"params": list(self.transformer.c_embedder.parameters()),
                           "lr": o.c_embedder_lr or self.config.lr})
        return groups

    # ------------------------------------------------------------------ data
    def cache_fingerprint(self) -> str:
        from ..cache import model_fingerprint

        p = self.pipe
        return model_fingerprint("dsd-lora-v1", self.config.panel_size, self.options.max_sequence_length,
                                 p.vae, p.text_encoder, p.text_encoder_2)

    def _panel(self, image):
        from ...image import prepare_reference

        size = self.config.panel_size
        # as generation: fitted to the panel (centre crop), then diffusers' VaeImageProcessor (x/255 -> 2x-1)
        return self.pipe.image_processor.preprocess(prepare_reference(image, size, size), height=size, width=size)

    @torch.no_grad()
    def encode_item(self, record) -> dict[str, torch.Tensor]:
        from ... import canvas as cv

        pipe, dev = self.pipe, self.device
        ref, tgt = self._panel(record.open("reference")), self._panel(record.open("target"))
        vae_in = lambda x: x.to(device=dev, dtype=pipe.vae.dtype)  # noqa: E731
        canvas = pipe.vae.encode(vae_in(torch.cat([ref, tgt], dim=3))).latent_dist.parameters
        condition = pipe.vae.encode(vae_in(cv.build_condition_canvas(ref))).latent_dist.parameters
        embeds, pooled, _ = pipe.encode_text(_clean(record.caption), dev, self.options.max_sequence_length)
        return {"canvas_posterior": canvas.cpu(), "condition_posterior": condition.cpu(),
                "prompt_embeds": embeds.cpu(), "pooled": pooled.cpu()}

    def after_encoding(self) -> None:
        """Text embeddings are cached now: on a GPU the text encoders wait in host memory, which frees ~9.5 GiB at
        full size for training. A pre-forward hook brings an encoder back to the GPU when a prompt is encoded again
        (validation images); :meth:`validation_images` sends them back afterwards."""
        if self.device.type != "cuda":
            return
        for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
            if encoder is not None and not getattr(encoder, "_dsd_onload_hook", False):
                encoder.register_forward_pre_hook(self._onload)
                encoder._dsd_onload_hook = True
        self._offload_encoders()

    def _onload(self, module, args) -> None:
        if next(module.parameters()).device != self.device:
            module.to(self.device)

    def _offload_encoders(self) -> None:
        if self.device.type != "cuda":
            return
        for encoder in (self.pipe.text_encoder, self.pipe.text_encoder_2):
            if encoder is not None:
                encoder.to("cpu")
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ objective
    def latents_from_posterior(self, parameters: torch.Tensor, generator, sampling: str = "sample"):
        """Shifted, scaled, packed latents from cached VAE posterior parameters: the steps of
        :meth:`DSDPipeline.prepare_condition` after ``vae.encode`` (one posterior sample per row)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from ... import canvas as cv

        cfg = self.pipe.vae.config
        rows = []
        for k in range(parameters.shape[0]):
            posterior = DiagonalGaussianDistribution(parameters[k:k + 1])
            rows.append(posterior.mode() if sampling == "mode" else posterior.sample(generator=generator))
        latents = (torch.cat(rows) - cfg.shift_factor) * cfg.scaling_factor
        return latents, cv.pack_latents(latents)

    def sample_sigmas(self, n: int, generator, image_tokens: int) -> torch.Tensor:
        from ... import canvas as cv

        o = self.options
        kind = o.timestep_sampling
        if kind == "uniform":
            return torch.rand(n, generator=generator)
        normal = torch.randn(n, generator=generator)
        if kind == "logit_normal":
            return torch.sigmoid(o.logit_mean + o.sigmoid_scale * normal)
        s = torch.sigmoid(o.sigmoid_scale * normal + (o.logit_mean if kind == "flux_shift" else 0.0))
        if kind == "sigmoid":
            return s
        if kind == "shift":
            return o.timestep_shift * s / (1 + (o.timestep_shift - 1) * s)
        mu = cv.compute_mu(image_tokens, self.pipe.scheduler.config)
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))

    def loss(self, model, batch, generator) -> torch.Tensor:
        from ... import canvas as cv

        o, c = self.options, self.config
        dev = self.device
        frozen_dtype = self.compute_dtype()
        n = batch["canvas_posterior"].shape[0]
        height, width = c.panel_size, 2 * c.panel_size
        x0, _ = self.latents_from_posterior(batch["canvas_posterior"].float(), generator)
        _, cond = self.latents_from_posterior(batch["condition_posterior"].float(), generator, o.condition_sampling)
        drop_cond = torch.rand(n, generator=generator) < o.condition_dropout
        drop_caption = torch.rand(n, generator=generator) < o.caption_dropout
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = self.sample_sigmas(n, generator, cv.num_image_tokens(height, width, self.pipe.vae_scale_factor))
        if o.guidance_mode == "constant":
            guidance = torch.full((n,), float(o.guidance_value))
        else:
            guidance = o.guidance_min + (o.guidance_max - o.guidance_min) * torch.rand(n, generator=generator)

        x0, noise, sigmas = x0.to(dev), noise.to(dev), sigmas.to(dev)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = cv.pack_latents((1 - s) * x0 + s * noise)
        target = cv.pack_latents(noise - x0)
        cond = torch.where(drop_cond.to(dev).view(-1, 1, 1), torch.zeros_like(cond.to(dev)), cond.to(dev))
        embeds = torch.where(drop_caption.to(dev).view(-1, 1, 1), self.empty_embeds.to(dev, batch["prompt_embeds"].dtype),
                             batch["prompt_embeds"])
        pooled = torch.where(drop_caption.to(dev).view(-1, 1), self.empty_pooled.to(dev, batch["pooled"].dtype),
                             batch["pooled"])
        img_ids = cv.latent_image_ids(height, width, dev, frozen_dtype, self.pipe.vae_scale_factor)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=dev, dtype=frozen_dtype)
        use_guidance = self.transformer.config.guidance_embeds
        pred = model(
            hidden_states=noisy.to(frozen_dtype), timestep=sigmas.to(frozen_dtype),
            guidance=guidance.to(dev, torch.float32) if use_guidance else None,
            pooled_projections=pooled.to(frozen_dtype), encoder_hidden_states=embeds.to(frozen_dtype),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False, condition_hidden_states=cond.to(frozen_dtype),
        )[0]
        err = (pred.float() - target.float()) ** 2
        if o.loss_region == "target":  # tokens are row-major over (rows, 2 * panel cols): keep the right columns
            rows, cols = height // 16, width // 16
            err = err.view(n, rows, cols, -1)[:, :, cols // 2:]
        return err.mean()

    def compute_dtype(self) -> torch.dtype:
        """The dtype the frozen model computes in (fp8 storage is upcast to it): the one :meth:`load` was given."""
        dtype = self.__dict__.get("dtype")
        if dtype is None:  # a subclass with its own load(): the compute dtype of x_embedder (never fp8-stored)
            dtype = self.transformer.x_embedder.weight.dtype
        return dtype

    def tokens_per_sample(self) -> int:
        from ... import canvas as cv

        return cv.num_image_tokens(self.config.panel_size, 2 * self.config.panel_size) \
            + self.options.max_sequence_length

    # ------------------------------------------------------------------ state and artifacts
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.transformer.named_parameters()
                if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.transformer.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise InputError(f"the checkpoint does not match this model ({len(missing)} missing, {len(unexpected)} "
                             f"unexpected tensors, e.g. {(missing or unexpected)[0]}); resume with the same model, "
                             "rank and LoRA targets.")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].dtype))

    def lora_state(self) -> tuple[dict, dict]:
        """(LoRA tensors with peft names, adapter config as plain values) of the trained adapter."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER)
        config = self.transformer.peft_config[ADAPTER].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config

    def export(self, output_dir: str) -> None:
        from ..export import save_dsd_model

        lora, lora_config = self.lora_state()
        c_embedder = {k: v.detach().cpu() for k, v in self.transformer.c_embedder.state_dict().items()}
        save_dsd_model(output_dir, lora, lora_config, c_embedder, base_transformer=self.source_transformer,
                       transformer_config=dict(self.transformer.config),
                       standalone=self.options.export_full_transformer, dtype=self.compute_dtype())

    def validation_images(self, records, step: int) -> list:
        """One image per pair: reference | target | generated (the right panel, seed ``validation_seed``)."""
        size = self.config.panel_size
        try:
            return self._render(records, size)
        finally:
            self._offload_encoders()

    def _render(self, records, size) -> list:
        import PIL.Image

        from ...image import prepare_reference

        out = []
        for r in records:
            ref = prepare_reference(r.open("reference"), size, size)
            tgt = prepare_reference(r.open("target"), size, size)
            gen = self.pipe(ref, _clean(r.caption), height=size, width=2 * size,
                            num_inference_steps=self.config.validation_steps,
                            guidance_scale=self.options.validation_guidance, seed=self.options.validation_seed).images[0]
            row = PIL.Image.new("RGB", (3 * size, size))
            for k, im in enumerate((ref, tgt, gen)):
                row.paste(im, (k * size, 0))
            out.append(row)
        return out

    def memory_estimate(self) -> str | None:
        from ..memory_estimate import estimate_dsd_training

        return estimate_dsd_training(self.config, self.options).summary()

    def describe(self) -> dict:
        return {"method": self.name, "source_transformer": self.source_transformer,
                "lora_targets": self.options.targets(), "rank": self.options.rank, "alpha": self.options.alpha}


def _clean(caption: str) -> str:
    from ...pipeline import clean_prompt

    return clean_prompt(caption)
