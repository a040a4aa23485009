"""DSD canvases for calibration, distillation and evaluation, and the noisy transformer inputs built from them.

A :class:`Canvas` is one encoded 1x2 DSD example: the clean canvas latents (reference | result, packed), the packed
condition latents (reference | black), the prompt's T5/CLIP embeddings and the empty prompt's (for the unconditional
branches of true guidance). Canvases are encoded from a paired dataset by the training engine (and cached there);
:func:`write_teacher_pairs` makes such a dataset from references and prompts alone, with the teacher painting the
right panels (DSD's own data recipe: the model's outputs are the targets).

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


def sample_sigmas(n: int, generator: torch.Generator, scheme: str = "logit_normal") -> torch.Tensor:
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.rand(n, generator=generator)


def _per_sample(value, n: int, dtype=torch.float32) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).to(dtype).expand(n) if value.numel() == 1 else value.to(dtype)
    return torch.full((n,), float(value), dtype=dtype)


def noisy_inputs(canvas: Canvas, generator: torch.Generator, sampling: InputSampling = InputSampling(),
                 sigma=None, branch: str | list[str] | None = None, guidance=None,
                 guidance_embeds: bool = True) -> tuple[dict, torch.Tensor]:
    """(transformer kwargs, flow-matching target) for a canvas batch (``latents`` of shape ``(B, N, 64)``).

    ``sigma`` / ``guidance`` (a number or one per sample) and ``branch`` (a name or one per sample) are drawn from
    ``generator`` when not given, per sample. Everything random comes from ``generator`` (exact resume).
    """
    x0 = canvas.latents
    n, device, dtype = x0.shape[0], x0.device, x0.dtype
    sigmas = _per_sample(sigma, n)
    if sigmas is None:
        sigmas = sample_sigmas(n, generator, sampling.sigma_sampling)
    if branch is None:
        probs = torch.tensor(sampling.branch_probs, dtype=torch.float64)
        branches = [BRANCHES[int(i)] for i in torch.multinomial(probs / probs.sum(), n, replacement=True,
                                                                generator=generator)]
    else:
        branches = [branch] * n if isinstance(branch, str) else list(branch)
    bad = [b for b in branches if b not in BRANCHES]
    if bad or len(branches) != n:
        raise InputError(f"unknown guidance branch {bad[0] if bad else branches!r}; choose from {', '.join(BRANCHES)}.")
    g = _per_sample(guidance, n)
    if g is None:
        lo, hi = sampling.guidance_range
        g = lo + (hi - lo) * torch.rand(n, generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=dtype)
    s = sigmas.to(device=device, dtype=dtype).view(-1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    text = torch.tensor([b == "text_image" for b in branches], device=device).view(-1, 1, 1)
    uncond = torch.tensor([b == "uncond" for b in branches], device=device).view(-1, 1, 1)
    kwargs = dict(
        hidden_states=x_t,
        condition_hidden_states=torch.where(uncond, torch.zeros_like(canvas.condition), canvas.condition),
        encoder_hidden_states=torch.where(text, canvas.prompt_embeds, canvas.empty_embeds.to(canvas.prompt_embeds)),
        pooled_projections=torch.where(text.view(-1, 1), canvas.pooled, canvas.empty_pooled.to(canvas.pooled)),
        timestep=sigmas.to(device=device, dtype=dtype),
        guidance=g.to(device=device, dtype=torch.float32) if guidance_embeds else None,
        txt_ids=canvas.text_ids, img_ids=canvas.img_ids, return_dict=False,
    )
    return kwargs, noise - x0


def collate_canvases(canvases: list[Canvas]) -> Canvas:
    """Canvases of equal size stacked into one batch (position ids are shared)."""
    first = canvases[0]
    return Canvas(**{f.name: getattr(first, f.name) if "ids" in f.name else
                     torch.cat([getattr(c, f.name) for c in canvases]) for f in fields(Canvas)})


# ---------------------------------------------------------------------------------------------- making canvases
def write_teacher_pairs(pipe, references, prompts, out_dir: str, panel_size: int = 512, steps: int = 28,
                        guidance: float = 3.5, seed: int = 0, progress=None) -> str:
    """A paired dataset painted by the teacher: for each (reference, prompt) the teacher generates the right panel.

    Writes ``out_dir/metadata.jsonl`` (``reference``, ``target``, ``caption``) with the PNGs next to it -- the format
    of :mod:`dsd_core.training.data`, so the engine encodes and caches it like any paired dataset. ``references``
    are PIL images; pair ``k`` uses seed ``seed + k``. The folder is written under a temporary name, then renamed.
    """
    from ..image import prepare_reference
    from ..training.data import METADATA
    from ..training.io import replace_dir

    if len(references) != len(prompts):
        raise InputError(f"got {len(references)} references and {len(prompts)} prompts; pass one prompt per reference.")
    if not references:
        raise InputError("no references given; pass at least one reference image and prompt.")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder for the teacher's pairs.")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=".pairs-")
    lines = []
    for k, (ref, prompt) in enumerate(zip(references, prompts)):
        ref = prepare_reference(ref, panel_size, panel_size)
        out = pipe(ref, prompt, height=panel_size, width=2 * panel_size, num_inference_steps=steps,
                   guidance_scale=guidance, seed=seed + k)
        ref.save(os.path.join(tmp, f"{k:05d}_reference.png"))
        out.images[0].save(os.path.join(tmp, f"{k:05d}_target.png"))
        lines.append(json.dumps({"reference": f"{k:05d}_reference.png", "target": f"{k:05d}_target.png",
                                 "caption": prompt, "seed": seed + k, "source": "teacher"}))
        if progress is not None:
            progress(k + 1, len(prompts))
    with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    replace_dir(tmp, out_dir)
    return out_dir
