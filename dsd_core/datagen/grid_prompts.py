"""Grid prompts: from seed captions to prompts that ask FLUX for a grid of one subject in different scenes.

The paper (dsd-reference.md §5) seeds GPT-4o with LAION captions and has it write prompts such as "a grid of 4 images
representing the same <subject>", each panel with its own content. Here the writer is one of:

* ``template`` (offline, deterministic): the caption is the subject; the panels get distinct scenes drawn from
  :data:`SCENES` with a seeded RNG;
* ``gemini`` / ``local``: an LLM (the prompt enhancer's Gemini client, or a local model folder) names the subject and
  writes the panel scenes as JSON (:data:`LLM_INSTRUCTION`); a caption without a clear subject is dropped, a reply
  that cannot be parsed falls back to the template for that caption (recorded in ``source``).

The prompt text itself is always built by :func:`build_prompt`, with the "same subject" instruction, so every grid
prompt has the same shape. Prompts are deduplicated (case, spacing and punctuation ignored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass

from ..errors import InputError
from .config import Layout

logger = logging.getLogger(__name__)

#: Scenes for the template writer: setting, pose or viewpoint changes that keep the subject's identity.
SCENES = (
    "on a wooden table in soft morning light", "on a sunny beach with waves behind", "in a snowy forest",
    "in a busy city street at night with neon lights", "on a grassy hill under a blue sky", "in a cozy library",
    "seen from above on a marble floor", "in a close-up shot against a plain studio background",
    "on a kitchen counter next to a window", "in a desert at golden hour", "floating in outer space",
    "in a rainy alley with reflections on the ground", "on a mountain top above the clouds",
    "in a modern living room", "seen from the side in a park in autumn", "on a shelf in a toy store",
    "under water surrounded by fish", "in a medieval castle hall", "on a red carpet with camera flashes",
    "in a field of sunflowers", "on a train station platform", "in a candle-lit room", "on a boat on a calm lake",
    "in a futuristic laboratory",
)
_POSITIONS = {"1x2": ("Left panel", "Right panel"),
              "2x2": ("Top left", "Top right", "Bottom left", "Bottom right")}

LLM_INSTRUCTION = (
    "Here is an image caption: \"{caption}\". We will ask an image model for a grid of {n} panels that all show "
    "the identical main subject of this caption (the same character, object, animal, logo or item, not just the "
    "same kind), each panel in a different setting, pose or viewpoint. If the caption has no clear main subject, "
    "reply NONE. Otherwise reply with JSON only, in one line: "
    "{{\"subject\": \"<a short, specific description of the subject with its distinctive details>\", "
    "\"panels\": [<{n} short descriptions of what is different in each panel>]}}.{variation}"
)


@dataclass(frozen=True)
class GridPrompt:
    """One grid to draw. ``index`` is its place in the run; ``seed`` the seed it is drawn with."""

    id: str
    index: int
    source_caption: str
    subject: str
    panels: tuple[str, ...]
    prompt: str
    layout: str
    seed: int
    source: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["panels"] = list(self.panels)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GridPrompt":
        return cls(**{**d, "panels": tuple(d["panels"])})

    def panel_caption(self, k: int) -> str:
        """The text caption of panel ``k`` from the prompt (subject + its scene)."""
        return f"{self.subject}, {self.panels[k]}"


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, spaces collapsed (the deduplication key)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def read_captions(path: str) -> list[str]:
    """Seed captions from a text file, one a line; blank lines and ``#`` comments skipped; duplicates dropped."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"captions file {path} does not exist; pass a text file with one caption a line.") from None
    except UnicodeDecodeError:
        raise InputError(f"captions file {path} is not UTF-8 text; save it as UTF-8, one caption a line.") from None
    captions, seen = [], set()
    for line in lines:
        line = " ".join(line.split())
        if not line or line.startswith("#") or normalize(line) in seen:
            continue
        seen.add(normalize(line))
        captions.append(line)
    if not captions:
        raise InputError(f"captions file {path} holds no captions; write one caption a line.")
    return captions


def build_prompt(subject: str, panels, layout: Layout) -> str:
    """The grid prompt: the layout, the "same subject" instruction, then each panel's content."""
    subject = re.sub(r"^(a|an|the)\s+", "", subject.strip().rstrip("."), flags=re.IGNORECASE)
    n = layout.panels
    if layout.rows == 1:
        head = (f"Two side-by-side panels of equal size, separated evenly, depicting the identical {subject}; "
                f"the very same subject appears in both panels.")
    else:
        head = (f"An evenly separated {layout.rows}x{layout.cols} grid of {n} panels of equal size, all depicting "
                f"the identical {subject}; the very same subject appears in every panel.")
    positions = _POSITIONS.get(layout.name) or [f"Panel {k + 1}" for k in range(n)]
    body = " ".join(f"{pos}: the {subject} {scene.strip().rstrip('.')}." for pos, scene in zip(positions, panels))
    return f"{head} {body}"


def _rng(seed: int, caption: str, variant: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{variant}|{caption}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def template_panels(caption: str, n: int, seed: int, variant: int) -> list[str]:
    return _rng(seed, caption, variant).sample(SCENES, n)


def parse_llm_reply(reply: str, n: int) -> tuple[str, list[str]] | None:
    """(subject, n panel scenes) from an LLM reply; None for NONE. Raises ValueError when it cannot be parsed."""
    text = (reply or "").strip()
    if re.fullmatch(r"\W*none\W*", text, flags=re.IGNORECASE):
        return None
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the reply")
    data = json.loads(text[start:end + 1])
    subject = data.get("subject") if isinstance(data, dict) else None
    panels = data.get("panels") if isinstance(data, dict) else None
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("no 'subject' string")
    if not isinstance(panels, list) or len(panels) < n or not all(isinstance(p, str) and p.strip() for p in panels[:n]):
        raise ValueError(f"'panels' is not a list of {n} strings")
    return subject.strip(), [p.strip() for p in panels[:n]]


def make_grid_prompts(captions: list[str], layout: Layout, num: int | None = None, seed: int = 0,
                      writer=None, writer_name: str = "template", progress=None) -> list[GridPrompt]:
    """``num`` deduplicated grid prompts (default: one per caption), cycling through the captions.

    ``writer`` is an object with ``ask(text, images=(), step=...)`` (the Gemini or local client) or None for the
    templates. Round ``r`` of the cycle asks for variation ``r`` of each caption.
    """
    from ..prompt import EnhanceError

    num = len(captions) if num is None else num
    out: list[GridPrompt] = []
    seen: set[str] = set()
    dropped: set[str] = set()
    variant = 0
    while len(out) < num:
        added = 0
        for caption in captions:
            if len(out) >= num:
                break
            if caption in dropped:
                continue
            subject, panels, source = caption, template_panels(caption, layout.panels, seed, variant), "template"
            if writer is not None:
                variation = f" This is variation {variant + 1}: choose settings unlike the obvious ones." \
                    if variant else ""
                text = LLM_INSTRUCTION.format(caption=caption.replace('"', "'"), n=layout.panels, variation=variation)
                try:
                    parsed = parse_llm_reply(writer.ask(text, step="grid prompt"), layout.panels)
                    if parsed is None:
                        logger.info("no clear subject in caption %r; skipped", caption)
                        dropped.add(caption)
                        continue
                    (subject, panels), source = parsed, writer_name
                except (ValueError, EnhanceError) as e:
                    logger.warning("grid prompt for %r from the template (%s reply unusable: %s)", caption,
                                   writer_name, e)
                    source = f"template (fallback: {e})"
            prompt = build_prompt(subject, panels, layout)
            key = normalize(prompt)
            if key in seen:
                continue
            seen.add(key)
            index = len(out)
            out.append(GridPrompt(id=f"{index:06d}", index=index, source_caption=caption, subject=subject,
                                  panels=tuple(panels), prompt=prompt, layout=layout.name, seed=seed + index,
                                  source=source))
            added += 1
            if progress is not None:
                progress(len(out), num)
        if added == 0:
            if len(out) < num:
                logger.warning("only %d distinct grid prompts could be made from %d captions (asked for %d)",
                               len(out), len(captions), num)
            break
        variant += 1
    return out
