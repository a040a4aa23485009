"""Curation: a vision-language model decides, step by step, whether two panels show the identical subject.

As in the paper (dsd-reference.md §5, step 3), the model is asked to (a) name the common subject, (b) describe it in
each image, (c) decide whether it is identical and conclude. The reply ends in labelled fields (:data:`ANSWER_FORMAT`)
that :func:`parse_verdict` reads; a JSON object with the same keys is accepted too. Clients:

* ``gemini``: the prompt enhancer's :class:`~dsd_core.prompt.GeminiEnhancer` (its key handling, retries, fallbacks);
* ``local``: the prompt enhancer's :class:`~dsd_core.prompt.LocalVLMEnhancer` (a local model folder);
* ``none``: every pair is kept (smoke tests, hand curation).

A verdict is symmetric, so each unordered pair of panels is asked once and the answer applies to both orders.
Rejections carry a reason: ``different_subject``, ``low_confidence``, ``malformed_reply`` (no usable verdict after
``malformed_retries`` re-asks) or ``curator_error`` (the client failed; the item is retried by the next run).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass

from ..errors import InputError

logger = logging.getLogger(__name__)

ANSWER_FORMAT = (
    "Answer in exactly this format, one field per line:\n"
    "SUBJECT: <the common subject, or NONE>\n"
    "IMAGE 1: <the subject in image 1, in detail>\n"
    "IMAGE 2: <the subject in image 2, in detail>\n"
    "REASONING: <the comparison>\n"
    "VERDICT: SAME or DIFFERENT\n"
    "CONFIDENCE: <a number from 0 to 1>"
)

CURATION_INSTRUCTIONS = (
    "You check training data for subject-driven image generation. Image 1 and image 2 should show the identical "
    "subject: the very same character, object, animal, logo or item, not merely one of the same kind. Think step by "
    "step: first name the main subject the two images share; then describe that subject in image 1 in detail "
    "(shape, colours, materials, markings, proportions, clothing, text); then describe it in image 2 the same way; "
    "then compare the details and decide whether it is the identical subject. Different poses, viewpoints, lighting, "
    "backgrounds and scenes are expected and fine; a different identity, design, colour scheme, marking or missing "
    "part is not. If there is no common subject, the verdict is DIFFERENT."
)

RETRY_NOTE = ("Your previous reply could not be read ({problem}). Reply again and end with the fields exactly as "
              "asked.")

REASONS = ("different_subject", "low_confidence", "malformed_reply", "curator_error")

_LABELS = {"subject": "SUBJECT", "image_1": r"IMAGE\s*1", "image_2": r"IMAGE\s*2", "reasoning": "REASONING",
           "verdict": "VERDICT", "confidence": "CONFIDENCE"}
# no word boundary before a label: the clients delete newlines, so "SAME\nCONFIDENCE:" arrives as "SAMECONFIDENCE:"
_LABEL_RE = re.compile(r"\**(" + "|".join(_LABELS.values()) + r")\**\s*[:=]\**", re.IGNORECASE)
_SAME = ("same", "identical", "yes", "true", "match")
_DIFFERENT = ("different", "not", "no", "false", "mismatch", "distinct")


@dataclass(frozen=True)
class Verdict:
    """A parsed curation reply. ``same`` is None when the reply had no usable verdict (``problem`` says why)."""

    same: bool | None
    confidence: float | None = None
    subject: str = ""
    image_1: str = ""
    image_2: str = ""
    reasoning: str = ""
    problem: str | None = None
    reply: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _field_key(label: str) -> str:
    norm = re.sub(r"\s+", " ", label.upper())
    return {"SUBJECT": "subject", "IMAGE 1": "image_1", "IMAGE 2": "image_2", "REASONING": "reasoning",
            "VERDICT": "verdict", "CONFIDENCE": "confidence"}.get(norm.replace("IMAGE1", "IMAGE 1")
                                                                  .replace("IMAGE2", "IMAGE 2"), "")


def _labelled_fields(text: str) -> dict[str, str]:
    """Label -> value; a label given twice keeps its last value (the conclusion comes last)."""
    fields: dict[str, str] = {}
    matches = list(_LABEL_RE.finditer(text))
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        key = _field_key(m.group(1))
        if key:
            fields[key] = text[m.end():end].strip().strip("*").strip()
    return fields


def _json_fields(text: str) -> dict[str, str] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    lowered = {str(k).lower().replace(" ", "_"): v for k, v in data.items()}
    if "verdict" not in lowered and "same" not in lowered and "identical" not in lowered:
        return None
    verdict = lowered.get("verdict", lowered.get("same", lowered.get("identical")))
    if isinstance(verdict, bool):
        verdict = "SAME" if verdict else "DIFFERENT"
    return {k: str(v) for k, v in {**lowered, "verdict": verdict}.items() if v is not None}


def _parse_same(value: str) -> bool | None:
    words = re.findall(r"[a-z]+", value.lower())[:3]
    if any(w in _DIFFERENT for w in words):
        return False
    if any(w in _SAME for w in words):
        return True
    return None


def _parse_confidence(value: str | None) -> tuple[float | None, str | None]:
    if value is None or not value.strip():
        return None, None
    m = re.search(r"\d+(?:\.\d+)?", value)
    if not m:
        return None, f"confidence {value[:40]!r} is not a number"
    number = float(m.group(0))
    if "%" in value[m.end():m.end() + 2] or 1.0 < number <= 100.0:
        number /= 100.0
    if not 0.0 <= number <= 1.0:
        return None, f"confidence {value[:40]!r} is outside 0..1"
    return number, None


def parse_verdict(reply: str | None) -> Verdict:
    """A :class:`Verdict` from a reply in :data:`ANSWER_FORMAT` (or JSON with those keys); never raises.

    The labels may share one line (clients deliver replies as one line) and may carry Markdown bold. A missing or
    unreadable VERDICT, or an unreadable CONFIDENCE, makes the verdict malformed (``same=None``, ``problem`` set);
    a missing CONFIDENCE is allowed (the threshold then does not apply).
    """
    text = (reply or "").strip()
    if not text:
        return Verdict(same=None, problem="empty reply", reply=reply or "")
    fields = _json_fields(text) or _labelled_fields(text)
    if "verdict" not in fields:
        return Verdict(same=None, problem="no VERDICT field", reply=text)
    same = _parse_same(fields["verdict"])
    if same is None:
        return Verdict(same=None, problem=f"VERDICT {fields['verdict'][:40]!r} is neither SAME nor DIFFERENT",
                       reply=text)
    confidence, problem = _parse_confidence(fields.get("confidence"))
    return Verdict(same=None if problem else same, confidence=confidence, subject=fields.get("subject", ""),
                   image_1=fields.get("image_1", ""), image_2=fields.get("image_2", ""),
                   reasoning=fields.get("reasoning", ""), problem=problem, reply=text)


def decide(verdict: Verdict, min_confidence: float, on_malformed: str = "reject") -> str | None:
    """None to keep the pair, else the rejection reason."""
    if verdict.same is None:
        return None if on_malformed == "keep" else "malformed_reply"
    if not verdict.same:
        return "different_subject"
    if verdict.confidence is not None and verdict.confidence < min_confidence:
        return "low_confidence"
    return None


def make_client(backend: str, gemini_model: str | None = None, local_vlm: str | None = None, timeout: float = 60.0,
                retries: int = 3, keep_loaded: bool = True, max_new_tokens: int = 400):
    """The prompt enhancer's client for ``backend`` (``gemini`` or ``local``), or None for ``none``/``template``."""
    from ..prompt import GeminiEnhancer, LocalVLMEnhancer

    if backend == "gemini":
        return GeminiEnhancer(gemini_model, timeout=timeout, retries=retries)
    if backend == "local":
        return LocalVLMEnhancer(local_vlm, max_new_tokens=max_new_tokens, keep_loaded=keep_loaded)
    return None


def check_client(backend: str, client) -> None:
    """Fail before any work when a client cannot possibly run (no Gemini key, no SDK, no local model folder)."""
    import os

    from ..prompt import EnhanceError
    from ..prompt.gemini import _env_flag, _sdk_available, resolve_api_key

    if backend == "gemini":
        try:
            key = resolve_api_key(client._key_file)
        except EnhanceError as e:
            raise InputError(f"Gemini: {e}.") from None
        if key is None and not _env_flag("GOOGLE_GENAI_USE_VERTEXAI"):
            raise InputError("no Gemini API key found: set GEMINI_API_KEY or GOOGLE_API_KEY (or DSD_GEMINI_KEY_FILE), "
                             "or pick --curator local / none and --prompter template.")
        if _sdk_available() is None:
            raise InputError("the Gemini backend needs google-genai: pip install google-genai.")
    elif backend == "local":
        if not client.model_path or not os.path.isdir(client.model_path):
            raise InputError(f"the local VLM folder {client.model_path or '(none given)'} does not exist; pass "
                             "--local-vlm FOLDER (e.g. HuggingFaceTB/SmolVLM-Instruct downloaded there).")


class Curator:
    """Asks ``client`` about pairs of panels; ``client`` None keeps everything (backend ``none``)."""

    def __init__(self, client=None, instructions: str | None = None, min_confidence: float = 0.5,
                 on_malformed: str = "reject", malformed_retries: int = 1):
        self.client = client
        self.instructions = (instructions or CURATION_INSTRUCTIONS).strip()
        self.min_confidence = min_confidence
        self.on_malformed = on_malformed
        self.malformed_retries = max(0, int(malformed_retries))

    @property
    def question(self) -> str:
        return f"{self.instructions}\n\n{ANSWER_FORMAT}"

    def judge(self, image_1, image_2) -> tuple[Verdict, str | None]:
        """(verdict, rejection reason or None). A client failure gives ``curator_error`` (not final: retried on
        resume); an unparseable reply is asked again up to ``malformed_retries`` times."""
        from ..prompt import EnhanceError

        if self.client is None:
            return Verdict(same=True, reasoning="curator none: every pair is kept"), None
        text = self.question
        verdict = Verdict(same=None, problem="not asked")
        for attempt in range(self.malformed_retries + 1):
            try:
                reply = self.client.ask(text, [image_1, image_2], step="curation")
            except EnhanceError as e:
                return Verdict(same=None, problem=str(e)), "curator_error"
            verdict = parse_verdict(reply)
            if verdict.same is not None:
                break
            logger.info("curation reply unusable (%s)%s", verdict.problem,
                        "; asking again" if attempt < self.malformed_retries else "")
            text = f"{self.question}\n\n{RETRY_NOTE.format(problem=verdict.problem)}"
        return verdict, decide(verdict, self.min_confidence, self.on_malformed)
