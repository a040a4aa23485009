"""DSD canvases for calibration, distillation and evaluation, and the noisy transformer inputs built from them.

A :class:`Canvas` is one encoded 1x2 DSD example: the clean canvas latents (reference | result, packed), the packed
condition latents (reference | black), the prompt's T5/CLIP embeddings and the empty prompt's (for the unconditional
branches of true guidance). Canvases come from the teacher itself (:func:`teacher_canvases`: the teacher generates the
right half from a reference and a prompt, as DSD's own data pipeline does) or from the training engine's paired
dataset; :func:`save_canvases` / :func:`load_canvases` cache them as safetensors.

:func:`noisy_inputs` builds one transformer call the way the student will be used at inference:

* flow matching: ``x_t = (1 - sigma) x0 + sigma eps``, target ``v = eps - x0``, ``timestep = sigma``;
* distilled guidance sampled uniformly from ``guidance_range`` (DSD samples at 3.5; Flux.1-lite v2 distils over 2-5);
* the true-guidance branch sampled with ``branch_probs`` -- ``text_image`` (prompt + reference), ``image`` (empty prompt
  + reference) and ``uncond`` (empty prompt + zero condition): the three passes of DSD's true guidance, so the
  student matches the teacher on each pass it will run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields

import torch

from .. import canvas as cv
from ..errors import InputError

BRANCHES = ("text_image", "image", "uncond")
SIGMA_SAMPLING = ("logit_normal", "uniform")


@dataclass
class Canvas:
    latents: torch.Tensor  # (1, N, 64) clean canvas latents, packed
    condition: torch.Tensor  # (1, N, 64) condition latents, packed
    prompt_embeds: torch.Tensor  # (1, L, D)
    pooled: torch.Tensor  # (1, P)
    empty_embeds: torch.Tensor  # (1, L, D): the empty prompt (true guidance's unconditional text)
    empty_pooled: torch.Tensor  # (1, P)
    text_ids: torch.Tensor  # (L, 3)
    img_ids: torch.Tensor  # (N, 3)

    def to(self, device=None, dtype=None) -> "Canvas":
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=dtype if t.is_floating_point() and "ids" not in f.name else None)
        return Canvas(**out)


@dataclass(frozen=True)
class InputSampling:
    """How noisy inputs are drawn (see module docstring)."""

    sigma_sampling: str = "logit_normal"
    guidance_range: tuple[float, float] = (3.5, 3.5)
    branch_probs: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self):
        if self.sigma_sampling not in SIGMA_SAMPLING:
            raise InputError(f"unknown sigma sampling {self.sigma_sampling!r}; choose {', '.join(SIGMA_SAMPLING)}.")
        if len(self.branch_probs) != 3 or min(self.branch_probs) < 0 or sum(self.branch_probs) <= 0:
            raise InputError("branch_probs must be three non-negative numbers (text_image, image, uncond).")
        lo, hi = self.guidance_range
        if lo > hi:
            raise InputError(f"guidance_range {self.guidance_range} has its minimum above its maximum.")


def sample_sigma(generator: torch.Generator, scheme: str = "logit_normal") -> float:
    u = torch.randn(1, generator=generator) if scheme == "logit_normal" else torch.rand(1, generator=generator)
    return float(torch.sigmoid(u) if scheme == "logit_normal" else u)


def noisy_inputs(canvas: Canvas, generator: torch.Generator, sampling: InputSampling = InputSampling(),
                 sigma: float | None = None, branch: str | None = None, guidance: float | None = None,
                 guidance_embeds: bool = True) -> tuple[dict, torch.Tensor]:
    """(transformer kwargs, flow-matching target) for one canvas; unset choices are drawn from ``generator``."""
    sigma = sample_sigma(generator, sampling.sigma_sampling) if sigma is None else float(sigma)
    if branch is None:
        probs = torch.tensor(sampling.branch_probs, dtype=torch.float64)
        branch = BRANCHES[int(torch.multinomial(probs / probs.sum(), 1, generator=generator))]
    if branch not in BRANCHES:
        raise InputError(f"unknown guidance branch {branch!r}; choose one of {', '.join(BRANCHES)}.")
    if guidance is None:
        lo, hi = sampling.guidance_range
        guidance = lo + (hi - lo) * float(torch.rand(1, generator=generator))
    x0 = canvas.latents
    noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    x_t = (1.0 - sigma) * x0 + sigma * noise
    text = branch == "text_image"
    cond = canvas.condition if branch != "uncond" else torch.zeros_like(canvas.condition)
    kwargs = dict(
        hidden_states=x_t,
        condition_hidden_states=cond,
        encoder_hidden_states=canvas.prompt_embeds if text else canvas.empty_embeds,
        pooled_projections=canvas.pooled if text else canvas.empty_pooled,
        timestep=torch.full((x0.shape[0],), sigma, dtype=x0.dtype, device=x0.device),
        guidance=torch.full((x0.shape[0],), guidance, dtype=torch.float32, device=x0.device) if guidance_embeds
        else None,
        txt_ids=canvas.text_ids, img_ids=canvas.img_ids, return_dict=False,
    )
    return kwargs, noise - x0


def collate(items: list[tuple[dict, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
    """Stack single-canvas inputs of equal size into one batch (ids are shared)."""
    kwargs = {}
    for k, v in items[0][0].items():
        if isinstance(v, torch.Tensor) and k not in ("txt_ids", "img_ids"):
            kwargs[k] = torch.cat([it[0][k] for it in items])
        else:
            kwargs[k] = v
    return kwargs, torch.cat([it[1] for it in items])


# ---------------------------------------------------------------------------------------------- making canvases
@torch.no_grad()
def encode_prompts(pipe, prompt: str, max_sequence_length: int = 512):
    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_text(prompt, device, max_sequence_length)
    empty, empty_pooled, _ = pipe.encode_text("", device, max_sequence_length)
    return embeds, pooled, empty, empty_pooled, text_ids


@torch.no_grad()
def teacher_canvases(pipe, references, prompts, height: int = 512, width: int = 1024, steps: int = 28,
                     guidance: float = 3.5, seed: int = 0, max_sequence_length: int = 512,
                     progress=None) -> list[Canvas]:
    """One canvas per (reference, prompt): the teacher pipeline paints the right half (its latents are ``x0``).

    ``references`` are PIL images (fitted to one panel) or ``(1, 3, H, W/2)`` tensors; canvas ``k`` uses seed
    ``seed + k`` for the generation and for the condition's posterior sample.
    """
    if len(references) != len(prompts):
        raise InputError(f"got {len(references)} references and {len(prompts)} prompts; pass one prompt per reference.")
    out = []
    dtype = pipe.transformer.dtype
    device = pipe._execution_device
    img_ids = cv.latent_image_ids(height, width, device, dtype, pipe.vae_scale_factor)
    for k, (ref, prompt) in enumerate(zip(references, prompts)):
        result = pipe(ref, prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      seed=seed + k, output_type="latent", max_sequence_length=max_sequence_length)
        reference = pipe._reference_tensor(ref, height, width // 2, "center_crop")
        condition = pipe.prepare_condition(reference, [seed + k], "sample", None, device, dtype)
        embeds, pooled, empty, empty_pooled, text_ids = encode_prompts(pipe, prompt, max_sequence_length)
        out.append(Canvas(result.images, condition, embeds, pooled, empty, empty_pooled, text_ids, img_ids))
        if progress is not None:
            progress(k + 1, len(prompts))
    return out


def save_canvases(path: str, canvases: list[Canvas], meta: dict | None = None) -> str:
    """Cache canvases in one safetensors file (written to a temp file, then renamed)."""
    from safetensors.torch import save_file

    state = {f"{i}.{f.name}": getattr(c, f.name).detach().cpu().clone()
             for i, c in enumerate(canvases) for f in fields(Canvas)}
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"count": str(len(canvases)), "meta": json.dumps(meta or {}, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_canvases(path: str) -> tuple[list[Canvas], dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        if "count" not in header:
            raise InputError(f"{path} is not a canvas cache written by dsd_core.distill (no 'count' in its header).")
        canvases = [Canvas(**{fl.name: f.get_tensor(f"{i}.{fl.name}") for fl in fields(Canvas)})
                    for i in range(int(header["count"]))]
    return canvases, json.loads(header.get("meta", "{}"))
