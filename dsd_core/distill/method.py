"""``distill``: the task-specific distillation method of the training engine (:mod:`dsd_core.training`).

The engine runs the loop (accelerate, optimiser, checkpoints and exact resume, SIGINT, logging, validation); this
method says what trains and how:

* **Teacher**: the DSD model (``--model``: ``transformer/`` + the DSD LoRA, fused into the weights), frozen, run
  under ``no_grad``. Its weight storage follows ``--memory`` (e.g. fp8).
* **Student**: a student folder from ``python -m dsd_core distill prune`` (``--student``), or built here from the
  teacher with ``--preset`` / ``--double`` / ``--single`` (:mod:`.layout`). Every student weight trains (float32).
* **Data**: the engine's paired dataset (``--data``: ``metadata.jsonl`` of reference / target / caption; make one from
  references and prompts with ``distill data``, the teacher painting the targets), encoded and cached by the engine
  exactly as for DSD LoRA training (same cache entries).
* **Objective** (:mod:`.losses`): ``L_flow + lambda_out |v_S - v_T|^2 + lambda_feat sum |h_S - h_T|^2`` on the same noisy
  canvas; noise levels as DSD training draws them (``timestep_sampling``); distilled guidance uniform in
  ``[guidance_min, guidance_max]`` (default 3.5, what DSD samples with); the true-guidance branch (prompt + reference /
  empty prompt + reference / empty prompt + zero condition) drawn per sample with the ``branch_*`` probabilities, so
  the student learns every pass it will run.
* **Artifact**: ``OUTPUT/transformer/`` -- the student as an ordinary DSD transformer folder (+ ``student.json``);
  ``OUTPUT`` is then a DSD model folder whose LoRA is fused (``generate --model OUTPUT`` loads it without a LoRA).
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import InputError
from ..training.methods.dsd_lora import DSDLoRAMethod, _clean
from .data import Canvas, InputSampling, noisy_inputs
from .features import BlockRecorder
from .layout import StudentLayout
from .losses import DistillWeights, distillation_loss
from .options import DistillOptions

logger = logging.getLogger(__name__)

STUDENT_DIR = "transformer"


def _weights(o: DistillOptions) -> DistillWeights:
    return DistillWeights(o.lambda_flow, o.lambda_out, o.lambda_feat, o.massive, o.mask_threshold)


def _sampling(o: DistillOptions) -> InputSampling:
    return InputSampling(guidance_range=(o.guidance_min, o.guidance_max),
                         branch_probs=(o.branch_text_image, o.branch_image, o.branch_uncond))


class DistillationMethod(DSDLoRAMethod):
    """Task-specific distillation of DSD into a pruned student (see the module docstring).

    Shares DSD LoRA training's data encoding (and cache), posterior sampling and noise-level sampling.
    """

    name = "distill"
    Options = DistillOptions

    # ------------------------------------------------------------------ models
    def load_teacher(self, device, dtype) -> None:
        """The teacher pipeline (LoRA fused, frozen) and the empty prompt; enough for :meth:`eval_inputs`."""
        from ..loading import load_pipeline, resolve_model
        from ..memory.config import MemoryConfig

        c, o = self.config, self.options
        if not c.model or c.from_flux:
            raise InputError("distillation needs the teacher as --model DSD_DIR (transformer/ + its LoRA); "
                             "--from-flux is for training DSD itself.")
        memory = MemoryConfig.from_name(c.memory or "full").replace(offload="none", fuse_lora=True,
                                                                  release_text_encoders=False)
        pipe = load_pipeline(base=c.base, model=c.model, dtype=dtype, device=str(device), memory=memory,
                             local_files_only=c.local_files_only)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe  # the teacher's pipeline (LoRA fused); VAE and text encoders are shared with the student
        self.teacher_transformer = resolve_model(c.model, None, False)[0]
        teacher = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, teacher):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.teacher = teacher
        self.device = torch.device(device)
        with torch.no_grad():
            empty, empty_pooled, _ = pipe.encode_text("", self.device, o.max_sequence_length)
        self.empty_embeds, self.empty_pooled = empty.cpu(), empty_pooled.cpu()

    def load(self, device, dtype) -> None:
        from ..pipeline import DSDPipeline
        from .student import build_student, load_student

        self.load_teacher(device, dtype)
        o, teacher = self.options, self.teacher
        if o.student:
            student, info = load_student(o.student, dtype=torch.float32)
            if info is None:
                raise InputError(f"{o.student} is a DSD transformer but not a student (no student.json); make one "
                                 "with `python -m dsd_core distill prune`.")
            self.layout = StudentLayout.from_dict(info)
            nd, ns = teacher.config.num_layers, teacher.config.num_single_layers
            if (self.layout.teacher_double, self.layout.teacher_single) != (nd, ns):
                raise InputError(f"the student {o.student} was pruned from a {self.layout.teacher_double}+"
                                 f"{self.layout.teacher_single}-block teacher, but --model has {nd}+{ns} blocks.")
            self.student_info = info
        else:
            self.layout = StudentLayout.for_teacher(teacher, o.preset, o.double or None, o.single or None)
            student = build_student(teacher, self.layout)
            self.student_info = {}
        student = student.to(torch.device(device), torch.float32)
        student.requires_grad_(True)
        student.train()
        self.student = self.transformer = student
        self.pairs = self.layout.feature_map(o.feature_map)
        self.student_pipe = DSDPipeline(**{**self.pipe.components, "transformer": student})
        self.student_pipe.set_progress_bar_config(disable=True)
        self.last_terms: dict[str, float] = {}
        logger.info("distilling into a student with %s", self.layout.describe())

    def trainable_module(self):
        return self.student

    def trainable_parameters(self) -> list:
        return [p for p in self.student.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ objective
    def batch_canvas(self, batch, generator) -> Canvas:
        """The engine's encoded batch (cached VAE posteriors + text) as a :class:`Canvas` batch."""
        from .. import canvas as cv

        c, o, dev = self.config, self.options, self.device
        dtype = self.teacher.dtype
        _, x0 = self.latents_from_posterior(batch["canvas_posterior"].float(), generator)
        _, cond = self.latents_from_posterior(batch["condition_posterior"].float(), generator, o.condition_sampling)
        n = x0.shape[0]
        embeds, pooled = batch["prompt_embeds"], batch["pooled"]
        height, width = c.panel_size, 2 * c.panel_size
        return Canvas(latents=x0.to(dev, dtype), condition=cond.to(dev, dtype), prompt_embeds=embeds.to(dev, dtype),
                      pooled=pooled.to(dev, dtype),
                      empty_embeds=self.empty_embeds.to(dev, dtype).expand(n, -1, -1),
                      empty_pooled=self.empty_pooled.to(dev, dtype).expand(n, -1),
                      text_ids=torch.zeros(embeds.shape[1], 3, device=dev, dtype=dtype),
                      img_ids=cv.latent_image_ids(height, width, dev, dtype, self.pipe.vae_scale_factor))

    def loss_terms(self, model, batch, generator) -> dict[str, torch.Tensor]:
        from .. import canvas as cv

        o, c = self.options, self.config
        canvas = self.batch_canvas(batch, generator)
        n = canvas.latents.shape[0]
        sigmas = self.sample_sigmas(n, generator, cv.num_image_tokens(c.panel_size, 2 * c.panel_size,
                                                                      self.pipe.vae_scale_factor))
        kwargs, target = noisy_inputs(canvas, generator, _sampling(o), sigma=sigmas,
                                      guidance_embeds=self.teacher.config.guidance_embeds)
        with torch.no_grad(), BlockRecorder(self.teacher, [t for _, t in self.pairs]) as rec_t:
            v_teacher = self.teacher(**kwargs)[0]
        with BlockRecorder(self.student, [s for s, _ in self.pairs]) as rec_s:
            v_student = model(**kwargs)[0]
        return distillation_loss(v_student, v_teacher, target, rec_s.outputs, rec_t.outputs, self.pairs, _weights(o))

    def loss(self, model, batch, generator) -> torch.Tensor:
        terms = self.loss_terms(model, batch, generator)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return terms["loss"]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_inputs(self, records, seed: int = 0, sigmas=(0.3, 0.6, 0.9), branch: str = "text_image") -> list[dict]:
        """Fixed noisy inputs from (held-out) pairs: each pair's canvas at each noise level in ``sigmas``."""
        generator = torch.Generator().manual_seed(seed)
        canvas = self.batch_canvas(self.collate([self.encode_item(r) for r in records]), generator)
        return [noisy_inputs(canvas, generator, _sampling(self.options), sigma=s, branch=branch,
                             guidance=self.options.validation_guidance,
                             guidance_embeds=self.teacher.config.guidance_embeds)[0] for s in sigmas]

    @torch.no_grad()
    def agreement(self, inputs: list[dict]) -> dict:
        """Student vs teacher on ``inputs``: relative velocity MSE and mean feature distance (:mod:`.evaluate`)."""
        from .evaluate import output_agreement

        was_training = self.student.training
        self.student.eval()
        try:
            return output_agreement(self.student, self.teacher, self.layout, inputs, self.options.feature_map,
                                    self.options.massive)
        finally:
            self.student.train(was_training)

    # ------------------------------------------------------------------ state and artifacts
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().clone() for n, p in self.student.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.student.state_dict()
        if set(own) != set(state) or any(tuple(own[k].shape) != tuple(state[k].shape) for k in own):
            raise InputError("the checkpoint holds a different student (other blocks or sizes); resume with the same "
                             "--student / --preset / --double / --single.")
        with torch.no_grad():
            for name, t in state.items():
                own[name].copy_(t.to(own[name].dtype))

    def export(self, output_dir: str) -> None:
        from .student import count_params, save_student, student_info

        info = student_info(self.student, self.layout, count_params(self.teacher),
                            teacher=os.path.abspath(self.teacher_transformer), lora_fused=True,
                            distilled={"steps": self.config.max_steps, "method": self.name,
                                       "last_loss_terms": self.last_terms or None})
        save_student(self.student, os.path.join(output_dir, STUDENT_DIR), info, replace=True, dtype=self.teacher.dtype)

    def validation_images(self, records, step: int) -> list:
        """One row per pair: reference | teacher | student (same seed)."""
        import PIL.Image

        from ..image import prepare_reference

        size, o = self.config.panel_size, self.options
        call = dict(height=size, width=2 * size, num_inference_steps=self.config.validation_steps,
                    guidance_scale=o.validation_guidance, seed=o.validation_seed)
        out = []
        for r in records:
            ref = prepare_reference(r.open("reference"), size, size)
            row = PIL.Image.new("RGB", (3 * size, size))
            row.paste(ref, (0, 0))
            row.paste(self.pipe(ref, _clean(r.caption), **call).images[0], (size, 0))
            row.paste(self.student_pipe(ref, _clean(r.caption), **call).images[0], (2 * size, 0))
            out.append(row)
        return out

    def memory_estimate(self) -> str | None:
        return None

    def describe(self) -> dict:
        return {"method": self.name, "teacher": self.teacher_transformer, **self.layout.to_dict(),
                "feature_map": self.options.feature_map, "massive": self.options.massive}
