"""Offline prompt enhancement with a local vision-language model (transformers).

Recommended model: **SmolVLM** (v1), e.g. ``HuggingFaceTB/SmolVLM-Instruct``
(2.2B parameters, Apache-2.0, ~4.5 GB in bf16). ``HuggingFaceTB/SmolVLM-500M-Instruct``
and ``HuggingFaceTB/SmolVLM-256M-Instruct`` are smaller and faster, with weaker
captions. Download one into a folder yourself, for example::

    huggingface-cli download HuggingFaceTB/SmolVLM-Instruct --local-dir models/LLM/SmolVLM-Instruct

and pass that folder as ``local_model_path`` (or set ``DSD_LOCAL_VLM_PATH``).
Nothing is ever downloaded here: everything is loaded with
``local_files_only=True``.

Why SmolVLM: it is the ``Idefics3`` architecture, supported natively by
transformers (``AutoModelForImageTextToText`` + ``AutoProcessor``, no remote
code), small enough to share a GPU with FLUX, and its processor works without
torchvision. (The Qwen-VL processors in transformers 5.x need torchvision for
their video processor.) The code itself is generic: any image-text-to-text
model whose processor has a chat template should work, but only the Idefics3
architecture is tested (on a tiny random model).

The flow is the same as Gemini's: caption the 512² center crop, then rewrite
the user prompt with that caption, greedy decoding, at most ``max_new_tokens``
new tokens per call. By default the model is unloaded after each use
(``keep_loaded=False``) so it does not hold memory needed for generation.
"""

from __future__ import annotations

import gc
import logging
import os
import threading

from PIL import Image

from .base import CAPTION_INSTRUCTION, EnhanceError, build_enhance_instruction, clean_reply, prepare_reference

logger = logging.getLogger(__name__)

RECOMMENDED_LOCAL_VLM = "HuggingFaceTB/SmolVLM-Instruct"

_loaded: dict[tuple, tuple] = {}
_load_lock = threading.Lock()


def unload_local_models() -> None:
    """Drop every model kept with ``keep_loaded=True``."""
    with _load_lock:
        _loaded.clear()
    gc.collect()


class LocalVLMEnhancer:
    """Two-step prompt enhancement with a local image-text-to-text model.

    Args:
        model_path: folder holding the model and processor files; empty means
            the DSD_LOCAL_VLM_PATH environment variable.
        max_new_tokens: cap on generated tokens per call.
        device: torch device string; default "cuda" when available, else "cpu".
        dtype: torch dtype; default bfloat16 on CUDA, float32 otherwise.
        keep_loaded: keep the model in memory between calls.
    """

    name = "local"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        max_new_tokens: int = 96,
        device: str | None = None,
        dtype=None,
        keep_loaded: bool = False,
    ):
        path = os.fspath(model_path) if model_path else os.environ.get("DSD_LOCAL_VLM_PATH", "")
        self.model_path = os.path.abspath(os.path.expanduser(path)) if path.strip() else ""
        self.max_new_tokens = max(1, int(max_new_tokens))
        self.device = device
        self.dtype = dtype
        self.keep_loaded = keep_loaded

    @property
    def cache_id(self) -> str:
        """Model identity used in the cache key."""
        return f"{self.model_path}|max_new_tokens={self.max_new_tokens}"

    def __repr__(self) -> str:
        return f"LocalVLMEnhancer(model_path={self.model_path!r}, max_new_tokens={self.max_new_tokens})"

    def _resolve_device(self):
        import torch

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        return device, dtype

    def _load(self):
        if not self.model_path:
            raise EnhanceError("no local VLM folder given (set local_model_path or DSD_LOCAL_VLM_PATH)")
        if not os.path.isdir(self.model_path):
            raise EnhanceError(f"the local VLM folder was not found: {self.model_path}")
        device, dtype = self._resolve_device()
        cache_key = (self.model_path, str(device), str(dtype))
        with _load_lock:
            if cache_key in _loaded:
                return _loaded[cache_key]
            try:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model_path, local_files_only=True, dtype=dtype
                )
                model.to(device).eval()
            except Exception as exc:
                detail = str(exc).splitlines()[0][:160] if str(exc) else ""
                raise EnhanceError(
                    f"the local VLM in {self.model_path} could not be loaded "
                    f"({type(exc).__name__}{': ' + detail if detail else ''})"
                ) from exc
            if getattr(processor, "chat_template", None) is None:
                raise EnhanceError(f"the local VLM in {self.model_path} has no chat template")
            if self.keep_loaded:
                _loaded[cache_key] = (processor, model, device)
            return processor, model, device

    def _generate(self, processor, model, device, text: str, image) -> str:
        """Greedy reply to ``text`` after ``image`` (one PIL image, a list of them, or None)."""
        import torch

        images = [] if image is None else [image] if isinstance(image, Image.Image) else list(image)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = [images] if images else None
        inputs = processor(text=[chat], images=images, return_tensors="pt").to(device)
        floating = {k: v.to(model.dtype) for k, v in inputs.items() if torch.is_floating_point(v)}
        inputs.update(floating)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return clean_reply(processor.batch_decode(new_tokens, skip_special_tokens=True)[0])

    def enhance(self, image: Image.Image, prompt: str) -> tuple[str, str]:
        """Return ``(enhanced_prompt, caption)``; raise :class:`EnhanceError` on any failure."""
        processor, model, device = self._load()
        try:
            try:
                caption = self._generate(processor, model, device, CAPTION_INSTRUCTION, prepare_reference(image))
                if not caption:
                    raise EnhanceError("the local VLM returned an empty caption")
                enhanced = self._generate(processor, model, device, build_enhance_instruction(prompt, caption), None)
                if not enhanced:
                    raise EnhanceError("the local VLM returned an empty enhanced prompt")
            except EnhanceError:
                raise
            except Exception as exc:
                raise EnhanceError(f"the local VLM failed while generating ({type(exc).__name__})") from exc
        finally:
            if not self.keep_loaded:
                del model
                gc.collect()
                _empty_cuda_cache()
        return enhanced, caption

    def ask(self, text: str, images=(), step: str = "request") -> str:
        """One greedy reply to ``images`` (PIL, in order) then ``text``, cleaned to one line; text-only works too.

        Data generation uses it for grid prompts, curation and captions. Raises :class:`EnhanceError` on any failure
        (also on an empty reply). The model is unloaded afterwards unless ``keep_loaded``.
        """
        processor, model, device = self._load()
        try:
            try:
                reply = self._generate(processor, model, device, text, [im.convert("RGB") for im in images])
            except Exception as exc:
                raise EnhanceError(f"the local VLM failed while generating in the {step} step "
                                   f"({type(exc).__name__})") from exc
            if not reply:
                raise EnhanceError(f"the local VLM returned an empty reply in the {step} step")
            return reply
        finally:
            if not self.keep_loaded:
                del model
                gc.collect()
                _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
