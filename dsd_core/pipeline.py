"""``DSDPipeline``: subject-preserving generation with Diffusion Self-Distillation on FLUX.1-dev.

Built on diffusers' :class:`~diffusers.FluxPipeline` (text encoding, LoRA loading, offload, packing helpers); only
``__call__`` is DSD's own. It reproduces the official ``FluxConditionalPipeline`` (same weights + same seed -> same
pixels, see ``tests/test_parity.py``):

1. the reference (already fitted to one panel, see :func:`dsd_core.image.prepare_reference`) is placed left of a
   black panel and the whole canvas is VAE-encoded in one call;
2. the condition latents are a posterior *sample* (or the mean with ``condition_sampling="mode"``), shifted and
   scaled, and packed like the image latents;
3. FLUX's flow-matching Euler sampler runs on the canvas with ``mu`` from the canvas token count, distilled guidance,
   and optionally DSD's two-scale true guidance (:mod:`dsd_core.guidance`);
4. the full canvas is decoded; the right half is the result, the left half the model's reconstruction of the
   reference.

Seeds: with seed ``S`` the posterior noise is drawn from ``torch.Generator("cpu").manual_seed(S)`` and the initial
noise from a separate ``torch.Generator("cpu").manual_seed(S)``, both in the unpacked latent shape and the model
dtype, then moved to the device. Image ``k`` of a batch uses seed ``S + k`` and equals a single run with that seed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import canvas as cv
from . import options
from .errors import GenerationCancelled, InputError
from .guidance import TrueGuidance, combine
from .hooks import CallHook
from .image import prepare_reference
from .numerics import check_finite, check_step, serialized

logger = logging.getLogger(__name__)

EXAMPLE = """
    >>> import torch
    >>> from dsd_core import DSDPipeline, load_image
    >>> pipe = DSDPipeline.from_dsd("black-forest-labs/FLUX.1-dev", "primecai/dsd_model", dtype=torch.bfloat16)
    >>> pipe.to("cuda")
    >>> out = pipe(load_image("cat.png"), "this cat wearing a wizard hat", seed=0)
    >>> out.images[0].save("wizard_cat.png")
"""


@dataclass
class DSDPipelineOutput(BaseOutput):
    """Result of :class:`DSDPipeline`.

    images: the generated right halves (list of PIL images, or an array/tensor for ``output_type="np"/"pt"``).
    references: the left halves: the model's reconstruction of the reference.
    panels: the full decoded canvases (reference reconstruction | result).
    seeds: the seed of each image (``None`` entries when explicit generators were passed).
    prompt: the cleaned prompt that was encoded.
    """

    images: Any
    references: Any = None
    panels: Any = None
    seeds: list = field(default_factory=list)
    prompt: str | None = None


def clean_prompt(prompt: str) -> str:
    """The reference's prompt cleaning: ``strip()``, then *delete* ``\\n`` and ``\\r`` (not replaced by spaces)."""
    return prompt.strip().replace("\n", "").replace("\r", "")


class DSDPipeline(FluxPipeline):
    r"""Diffusion Self-Distillation: generate a new image of the reference's subject from a prompt.

    Components (as in :class:`~diffusers.FluxPipeline`): ``scheduler`` (FlowMatchEulerDiscreteScheduler with the
    FLUX.1-dev config), ``vae`` (AutoencoderKL), ``text_encoder`` + ``tokenizer`` (CLIP-L), ``text_encoder_2`` +
    ``tokenizer_2`` (T5-XXL) and ``transformer`` (:class:`dsd_core.DSDTransformer2DModel`).

    The pipeline knows nothing of memory modes or speed options: a loader installs their per-call behaviour as named
    :class:`~dsd_core.hooks.CallHook` objects (:meth:`set_call_hook`), which ``__call__`` runs at fixed points.

    Example:
    """ + EXAMPLE

    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self._call_hooks: dict[str, CallHook] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dsd(cls, base: str | None = None, model: str | None = None, **kwargs) -> "DSDPipeline":
        """Load the full DSD model set: ``load_pipeline(base=..., model=..., **kwargs)`` building this class.

        See :func:`dsd_core.loading.load_pipeline` for the arguments."""
        from .assembly import build_pipeline
        from .sources import FolderSource

        build = {k: kwargs.pop(k) for k in ("memory", "speed", "device", "dtype") if k in kwargs}
        return build_pipeline(FolderSource.from_kwargs(base=base, model=model, **kwargs), pipeline_class=cls,
                              **build)

    def load_dsd_lora(self, path: str, adapter_name: str = "dsd") -> None:
        """Load a LoRA (``.safetensors``) as a PEFT adapter, unfused, like the reference (diffusers'
        ``load_lora_weights``: the transformer, and the text encoders if the file carries weights for them)."""
        from .validation import check_lora_file

        if not str(path).endswith(".safetensors"):
            raise InputError(f"{path} is not a .safetensors file; only safetensors LoRAs are loaded (never pickle).")
        # the header only: a valid file, LoRA weights, target layers and shapes that fit this transformer
        check_lora_file(path, self.transformer.config)
        self.load_lora_weights(str(path), adapter_name=adapter_name, low_cpu_mem_usage=True)

    # ------------------------------------------------------------------ per-call hooks
    def set_call_hook(self, name: str, hook: CallHook | None) -> None:
        """Install ``hook`` under ``name`` (replacing the one of that name), or remove it with ``None``.

        Hooks run in the order they were first installed; see :mod:`dsd_core.hooks`."""
        if hook is None:
            self._call_hooks.pop(name, None)
        else:
            self._call_hooks[name] = hook

    @property
    def call_hooks(self) -> dict[str, CallHook]:
        """The installed hooks by name (a copy)."""
        return dict(self._call_hooks)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def prepare_condition(
        self,
        reference: torch.Tensor,
        seeds: list[int | None],
        condition_sampling: str = "sample",
        generators: list[torch.Generator] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Encode the condition canvas and return packed condition latents ``(B or 1, tokens, 64)``.

        ``reference`` is ``(1, 3, H, Wp)`` in [-1, 1]. With ``"sample"`` one posterior sample is drawn per seed
        (a fresh CPU generator seeded with it, unless ``generators`` are given); ``"mode"`` uses the mean once.
        """
        device = device or self._execution_device
        canvas = cv.build_condition_canvas(reference)
        posterior = self.vae.encode(canvas.to(device=device, dtype=self.vae.dtype)).latent_dist
        if condition_sampling == "mode":
            latents = posterior.mode()
        else:
            gens = generators or [torch.Generator("cpu").manual_seed(s) for s in seeds]
            latents = torch.cat([posterior.sample(generator=g) for g in gens], dim=0)
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        latents = cv.pack_latents(latents)
        return latents.to(dtype or self.transformer.dtype)

    @torch.no_grad()
    def prepare_noise(
        self,
        seeds: list[int | None],
        height: int,
        width: int,
        generators: list[torch.Generator] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Initial noise, one draw per seed in the *unpacked* shape ``(1, 16, h, w)`` and ``dtype``, then packed."""
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        h, w = cv.latent_size(height, width, self.vae_scale_factor)
        channels = self.transformer.config.in_channels // 4
        gens = generators or [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = torch.cat([randn_tensor((1, channels, h, w), generator=g, device=device, dtype=dtype) for g in gens])
        return cv.pack_latents(noise)

    def prepare_timesteps(self, num_inference_steps: int, image_tokens: int, device) -> torch.Tensor:
        """The reference's schedule: sigmas ``linspace(1, 1/N, N)``, shifted with ``mu`` from the token count."""
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = cv.compute_mu(image_tokens, self.scheduler.config)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        self._num_timesteps = len(timesteps)
        return timesteps

    @torch.no_grad()
    def encode_text(self, prompt: str, device, max_sequence_length: int = options.MAX_SEQUENCE_LENGTH):
        """(T5 embeddings, CLIP pooled embeddings, text ids) for one prompt string (through the ``encode`` hooks)."""
        def compute():
            return self.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                      max_sequence_length=max_sequence_length)

        for hook in reversed(list(self._call_hooks.values())):
            compute = functools.partial(hook.encode, (prompt, max_sequence_length), compute)
        return tuple(t.to(device) for t in compute())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> decoded canvas ``(B, 3, H, W)`` in [-1, 1] (the full panel, in the VAE dtype)."""
        latents = cv.unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def check_dsd_inputs(self, height, width, num_inference_steps, condition_sampling, num_images_per_prompt):
        cv.check_canvas_size(height, width)
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
        if condition_sampling not in options.CONDITION_SAMPLING:
            raise InputError(f"condition_sampling must be 'sample' or 'mode', got {condition_sampling!r}.")
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}.")
        if not hasattr(self.transformer, "c_embedder"):
            raise InputError(
                f"the pipeline's transformer is a {type(self.transformer).__name__} without c_embedder; "
                "DSD needs dsd_core.DSDTransformer2DModel (load it with DSDPipeline.from_dsd)."
            )
        if max(height, width // 2) > options.PANEL_WARN:
            logger.warning(
                "panel %dx%d is larger than %d px; DSD was trained at %dx%d panels and is known to distort "
                "above ~%d. Use %d for the reference's quality.", width // 2, height, options.PANEL_WARN,
                options.PANEL, options.PANEL, options.PANEL_WARN, options.PANEL,
            )

    # ------------------------------------------------------------------ call
    @serialized  # one generation at a time per pipeline (dsd_core.numerics)
    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | torch.Tensor,
        prompt: str,
        height: int = options.PANEL,
        width: int = 2 * options.PANEL,
        num_inference_steps: int = options.STEPS,
        guidance_scale: float = options.GUIDANCE,
        image_guidance_scale: float = options.IMAGE_GUIDANCE,
        text_guidance_scale: float = options.TEXT_GUIDANCE,
        true_guidance_start_step: int = options.TRUE_GUIDANCE_START,
        true_guidance_end_step: int | None = None,
        negative_prompt: str = "",
        seed: int | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        condition_generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        condition_sampling: str = "sample",
        lora_scale: float | None = None,
        batch_true_guidance: bool = False,
        fit_mode: str = "center_crop",
        max_sequence_length: int = options.MAX_SEQUENCE_LENGTH,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress_callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ):
        r"""Generate ``num_images_per_prompt`` images of the reference's subject.

        Args:
            image: the reference, a PIL image (fitted to one ``(width/2) x height`` panel with ``fit_mode`` unless it
                already has that size) or a tensor ``(1, 3, H, W/2)`` in [-1, 1] used as is.
            prompt: what to generate. Cleaned like the reference (strip, newlines deleted).
            height, width: the canvas (two panels side by side); reference: 512 x 1024. Multiples of 16 per panel.
            num_inference_steps: Euler steps (reference 28).
            guidance_scale: FLUX distilled guidance (reference 3.5); the same value is fed to every pass.
            image_guidance_scale, text_guidance_scale: DSD true guidance ``s_i`` and ``s_t`` (both 1.0 = off; ``s_t``
                only acts when ``s_i > 1``, as in the reference). See :mod:`dsd_core.guidance`.
            true_guidance_start_step, true_guidance_end_step: the step window of true guidance (reference: 2, None;
                a ``guidance`` hook such as the fast mode may set the end when it is None).
            negative_prompt: text of the unconditional passes (reference ``""``).
            seed: an int (image k gets ``seed + k``) or one int per image. ``None`` picks a random seed, returned in
                ``output.seeds``.
            generator, condition_generator: advanced: explicit generators for the initial noise and the posterior
                sample, one per image (overrides ``seed`` for that draw).
            condition_sampling: ``"sample"`` (reference: a posterior sample) or ``"mode"`` (the posterior mean).
            lora_scale: multiplier of the loaded LoRA for this call (``None`` = as loaded, 1.0 in the reference).
            batch_true_guidance: run the three true-guidance passes as one batch (faster on a GPU with memory to
                spare; equal to sequential up to float rounding). The reference runs them sequentially.
            fit_mode: how a PIL reference is fitted to the panel: ``center_crop`` (reference), ``pad``, ``stretch``.
            output_type: ``"pil"``, ``"np"`` (float32 HWC in [0, 1]) or ``"pt"`` (float32 BCHW in [0, 1]).
            callback_on_step_end: diffusers' callback ``(pipe, step, timestep, tensors) -> dict``. It may replace
                ``latents``, and may raise (or set ``pipe._interrupt = True``) to cancel the run.
            progress_callback: ``(step, total, latents)`` called after each step, for progress bars and previews; it
                may raise to cancel.

        Returns:
            :class:`DSDPipelineOutput` (or a tuple ``(images,)`` when ``return_dict=False``).

        Raises:
            GenerationCancelled: when ``pipe._interrupt`` is set during the run.
        """
        # 1. Check the inputs; fix the seeds, generators and the true-guidance schedule
        from .validation import check_generation, check_reference

        check_generation(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                         text_guidance_scale=text_guidance_scale, true_guidance_start_step=true_guidance_start_step,
                         true_guidance_end_step=true_guidance_end_step, seed=seed,
                         num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale,
                         negative_prompt=negative_prompt)
        check_reference(image)
        self.check_dsd_inputs(height, width, num_inference_steps, condition_sampling, num_images_per_prompt)
        self._check_callback_inputs(callback_on_step_end_tensor_inputs)
        n = num_images_per_prompt
        seeds = self._resolve_seeds(seed, n, generator, condition_generator)
        noise_gens, cond_gens = _as_list(generator, n, "generator"), _as_list(condition_generator, n,
                                                                             "condition_generator")
        guidance = self._true_guidance(image_guidance_scale, text_guidance_scale, true_guidance_start_step,
                                       true_guidance_end_step, num_inference_steps)
        self._start_call(guidance_scale, lora_scale)
        device, dtype = self._execution_device, self.transformer.dtype

        # 2. Encode the prompt (and the negative prompt when true guidance is on; the reference gates it on s_i > 1)
        prompt = clean_prompt(prompt)
        text = self.encode_text(prompt, device, max_sequence_length)
        negative = self.encode_text(negative_prompt, device, max_sequence_length) if guidance.enabled else None

        # 3. Condition latents from the 1x2 canvas
        reference = self._reference_tensor(image, height, width // 2, fit_mode)
        cond = self.prepare_condition(reference, seeds, condition_sampling, cond_gens, device, dtype)
        check_finite(cond, "condition")

        # 4. Initial noise, position ids and timesteps
        latents = self.prepare_noise(seeds, height, width, noise_gens, device, dtype)
        img_ids = cv.latent_image_ids(height, width, device, dtype, self.vae_scale_factor)
        timesteps = self.prepare_timesteps(num_inference_steps, latents.shape[1], device)

        # 5. Denoising loop
        inputs = _StepInputs.build(text, negative, cond, img_ids, guidance, guidance_scale, n, batch_true_guidance,
                                   self.transformer.config.guidance_embeds, device)
        self._before_denoising((prompt, negative_prompt), device, max_sequence_length)
        latents = self._denoise(latents, timesteps, inputs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                progress_callback)

        # 6. Decode the full canvas; right half = result, left half = reconstruction of the reference
        return self._output(latents, height, width, output_type, return_dict, seeds, prompt)

    # ------------------------------------------------------------------ call steps
    def _check_callback_inputs(self, names) -> None:
        for k in names:
            if k not in self._callback_tensor_inputs:
                raise InputError(f"callback tensor {k!r} is not available; choose from {self._callback_tensor_inputs}.")

    def _true_guidance(self, image_scale, text_scale, start_step, end_step, num_inference_steps) -> TrueGuidance:
        guidance = TrueGuidance(image_scale, text_scale, start_step, end_step)
        for hook in self._call_hooks.values():
            guidance = hook.guidance(guidance, num_inference_steps)
        return guidance

    def _start_call(self, guidance_scale: float, lora_scale: float | None) -> None:
        """diffusers' per-call state (read by its properties and callbacks)."""
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = None if lora_scale is None else {"scale": float(lora_scale)}
        self._interrupt = False
        self._current_timestep = None

    def _before_denoising(self, prompts: tuple[str, ...], device, max_sequence_length: int) -> None:
        encode = functools.partial(self.encode_text, device=device, max_sequence_length=max_sequence_length)
        for hook in list(self._call_hooks.values()):
            hook.before_denoising(self, prompts, encode)

    def _denoise(self, latents, timesteps, inputs: "_StepInputs", callback_on_step_end, callback_tensor_inputs,
                 progress_callback) -> torch.Tensor:
        total = len(timesteps)
        with self.transformer.condition_cache(), self.progress_bar(total=total) as bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    raise GenerationCancelled(f"generation cancelled at step {i} of {total}")
                self._current_timestep = t
                noise_pred = self.guided_velocity(i, latents, t.expand(inputs.batch).to(latents.dtype), inputs)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                check_step(latents, noise_pred, i, total)
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": inputs.prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_tensor_inputs})
                    latents = (out or {}).pop("latents", latents)
                if progress_callback is not None:
                    progress_callback(i + 1, total, latents)
                bar.update()
        if self._interrupt:
            raise GenerationCancelled(f"generation cancelled after step {total}")
        self._current_timestep = None
        return latents

    def guided_velocity(self, step: int, latents: torch.Tensor, timestep: torch.Tensor,
                        inputs: "_StepInputs") -> torch.Tensor:
        """The velocity of one step: one pass, or DSD's three true-guidance passes combined.

        The three passes run in the reference's order (text+image, unconditional, image only), or as one batch of
        three with ``batch_true_guidance`` (equal up to float rounding)."""
        g = inputs.guidance
        if not g.active(step):
            return self._velocity(inputs.embeds, inputs.pooled, inputs.cond, latents, timestep, inputs, "cond")
        if inputs.batched is not None:
            embeds, pooled, cond = inputs.batched
            v = self._velocity(embeds, pooled, cond, latents.repeat(3, 1, 1), timestep.repeat(3), inputs, "batch")
            v_ti, v_uu, v_ui = v.chunk(3)
        else:
            v_ti = self._velocity(inputs.embeds, inputs.pooled, inputs.cond, latents, timestep, inputs, "cond")
            v_uu = self._velocity(inputs.neg_embeds, inputs.neg_pooled, inputs.zero_cond, latents, timestep, inputs,
                                  "uncond")
            v_ui = self._velocity(inputs.neg_embeds, inputs.neg_pooled, inputs.cond, latents, timestep, inputs,
                                  "image")
        return combine(v_ti, v_ui, v_uu, g.image_scale, g.text_scale)

    def _velocity(self, embeds, pooled, condition, x, t, inputs: "_StepInputs", branch: str) -> torch.Tensor:
        """One transformer pass, inside the ``branch`` contexts of the installed hooks."""
        with contextlib.ExitStack() as stack:
            for hook in self._call_hooks.values():
                stack.enter_context(hook.branch(self, branch))
            return self.transformer(
                hidden_states=x, timestep=t / 1000,
                guidance=None if inputs.guidance_tensor is None else inputs.guidance_tensor.expand(x.shape[0]),
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=inputs.text_ids,
                img_ids=inputs.img_ids, joint_attention_kwargs=self._joint_attention_kwargs, return_dict=False,
                condition_hidden_states=condition,
            )[0]

    def _output(self, latents, height: int, width: int, output_type: str, return_dict: bool, seeds, prompt: str):
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return DSDPipelineOutput(images=latents, seeds=seeds, prompt=prompt) if return_dict else (latents,)
        panels = self.decode(latents, height, width)
        check_finite(panels, "decoded")
        panels = self.image_processor.postprocess(panels, output_type="pt")  # (x/2+.5).clamp in dtype, then float
        references, images = cv.split_canvas(panels)
        images, references, panels = (self._convert(x, output_type) for x in (images, references, panels))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DSDPipelineOutput(images=images, references=references, panels=panels, seeds=seeds, prompt=prompt)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _resolve_seeds(seed, n, generator, condition_generator) -> list[int | None]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise InputError(f"got {len(seed)} seeds for {n} images; pass one seed per image or a single int.")
            return [int(s) for s in seed]
        if seed is None:
            if generator is not None and condition_generator is not None:
                return [None] * n
            seed = random.SystemRandom().randrange(2**32)  # recorded in the output so the run can be repeated
        return [(int(seed) + k) % 2**64 for k in range(n)]  # torch generators take seeds below 2**64

    def _reference_tensor(self, image, height: int, panel_w: int, fit_mode: str) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3 or tuple(image.shape[2:]) != (height,
                                                                                                          panel_w):
                raise InputError(
                    f"a tensor reference must have shape (1, 3, {height}, {panel_w}) in [-1, 1], got "
                    f"{tuple(image.shape)}; pass a PIL image to have it fitted to the panel."
                )
            return image.float()
        if not isinstance(image, PIL.Image.Image):
            raise InputError(f"image must be a PIL image or a tensor, got {type(image).__name__}.")
        if image.size != (panel_w, height):
            image = prepare_reference(image, height, panel_w, mode=fit_mode)
        # diffusers' VaeImageProcessor: EXIF transpose is done in prepare_reference; x/255 in float32, then 2x-1
        return self.image_processor.preprocess(image.convert("RGB"), height=height, width=panel_w)

    @staticmethod
    def _convert(x: torch.Tensor, output_type: str):
        if output_type == "pt":
            return x.float()
        arr = x.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return arr
        if output_type == "pil":
            return [PIL.Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]
        raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")


def _as_list(gen, n: int, name: str):
    if gen is None:
        return None
    gens = list(gen) if isinstance(gen, (list, tuple)) else [gen]
    if len(gens) != n:
        raise InputError(f"got {len(gens)} {name}s for {n} images; pass one per image.")
    return gens


@dataclass
class _StepInputs:
    """What every step of one call reads: text embeddings and condition latents repeated per image, ids, the
    guidance settings and, with batched true guidance, the three passes' inputs concatenated once."""

    guidance: TrueGuidance
    batch: int
    embeds: torch.Tensor
    pooled: torch.Tensor
    prompt_embeds: torch.Tensor  # unbatched, for callbacks
    text_ids: torch.Tensor
    img_ids: torch.Tensor
    cond: torch.Tensor
    guidance_tensor: torch.Tensor | None
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    zero_cond: torch.Tensor | None = None
    batched: tuple | None = None

    @classmethod
    def build(cls, text, negative, cond, img_ids, guidance: TrueGuidance, guidance_scale: float, n: int,
              batch_true_guidance: bool, guidance_embeds: bool, device) -> "_StepInputs":
        def batch(t: torch.Tensor) -> torch.Tensor:  # contiguous copies, like the reference's repeat()
            return t.repeat(n, *([1] * (t.ndim - 1))) if t.shape[0] == 1 and n > 1 else t

        prompt_embeds, pooled, text_ids = text
        s = cls(guidance=guidance, batch=n, embeds=batch(prompt_embeds), pooled=batch(pooled),
                prompt_embeds=prompt_embeds, text_ids=text_ids, img_ids=img_ids, cond=cond,
                guidance_tensor=torch.tensor([guidance_scale], device=device, dtype=torch.float32)
                if guidance_embeds else None)
        if guidance.enabled:
            s.zero_cond = torch.zeros_like(cond)
            s.neg_embeds, s.neg_pooled = batch(negative[0]), batch(negative[1])
            if batch_true_guidance:
                s.batched = (torch.cat([s.embeds, s.neg_embeds, s.neg_embeds]),
                             torch.cat([s.pooled, s.neg_pooled, s.neg_pooled]),
                             torch.cat([batch(cond), batch(s.zero_cond), batch(cond)]))
        return s
