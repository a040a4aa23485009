"""``enhance_prompt``: the one entry point the CLI and the ComfyUI nodes call."""

from __future__ import annotations

import logging
import os

from PIL import Image

from ..options import ENHANCE_BACKENDS as BACKENDS
from .base import INSTRUCTIONS_VERSION, EnhanceError, EnhanceResult
from .cache import PromptCache, image_digest, make_key
from .gemini import GeminiEnhancer
from .local import LocalVLMEnhancer

logger = logging.getLogger(__name__)

_GEMINI_OPTIONS = {"backoff", "max_backoff", "base_url", "key_file"}
_LOCAL_OPTIONS = {"max_new_tokens", "device", "dtype", "keep_loaded"}


def _make_enhancer(backend: str, model, local_model_path, timeout, retries, kw):
    allowed = _GEMINI_OPTIONS if backend == "gemini" else _LOCAL_OPTIONS
    unknown = set(kw) - allowed - {"cache_dir"}
    if unknown:
        raise TypeError(f"enhance_prompt() got options the {backend!r} backend does not take: {sorted(unknown)}")
    options = {k: v for k, v in kw.items() if k in allowed}
    if backend == "gemini":
        return GeminiEnhancer(model, timeout=timeout, retries=retries, **options)
    return LocalVLMEnhancer(local_model_path, **options)


def enhance_prompt(
    image: Image.Image,
    prompt: str,
    backend: str = "gemini",
    model: str | None = None,
    local_model_path: str | os.PathLike | None = None,
    timeout: float = 30.0,
    retries: int = 2,
    use_cache: bool = True,
    **kw,
) -> EnhanceResult:
    """Rewrite ``prompt`` into a detailed one using the reference ``image``.

    Args:
        image: the reference image (any size; it is center-cropped to 512²).
        prompt: the user's prompt.
        backend: "gemini" (Gemini API), "local" (local VLM folder) or "none".
        model: Gemini model name (backend "gemini"); empty means the default.
        local_model_path: model folder (backend "local").
        timeout: seconds per HTTP request (Gemini).
        retries: extra attempts after timeouts, 429 and 5xx (Gemini).
        use_cache: read and write the result cache.
        **kw: backend options: ``base_url``, ``key_file``, ``backoff``,
            ``max_backoff`` (Gemini); ``max_new_tokens``, ``device``, ``dtype``,
            ``keep_loaded`` (local); ``cache_dir`` (both).

    Returns:
        An :class:`EnhanceResult`. On any network, credential, quota, server,
        reply-format or model-loading problem it holds the original prompt,
        ``enhanced=False`` and a one-sentence ``warning``; one warning is logged.

    Raises:
        ValueError: unknown backend. TypeError: wrong argument types/options.
    """
    backend_name = (backend or "").strip().lower()
    if backend_name not in BACKENDS:
        raise ValueError(f"unknown prompt enhancement backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    if backend_name == "none":
        return EnhanceResult(prompt=prompt, enhanced=False, caption=None, backend="none")
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, not {type(image).__name__}")

    enhancer = _make_enhancer(backend_name, model, local_model_path, timeout, retries, kw)
    cache = PromptCache(kw.get("cache_dir")) if use_cache else None
    key = make_key(image_digest(image), prompt, backend_name, enhancer.cache_id) if cache else None

    if cache is not None:
        record = cache.get(key)
        if record is not None:
            logger.debug("Prompt enhancement cache hit (%s)", backend_name)
            return EnhanceResult(
                prompt=record["enhanced"], enhanced=True, caption=record.get("caption"),
                backend=backend_name, cached=True,
            )

    try:
        enhanced, caption = enhancer.enhance(image, prompt)
    except EnhanceError as exc:
        warning = f"Prompt enhancement ({backend_name}) fell back to the original prompt: {exc}."
        logger.warning("%s", warning)
        return EnhanceResult(prompt=prompt, enhanced=False, caption=None, backend=backend_name, warning=warning)

    logger.info("Prompt enhanced with %s: %r -> %r", backend_name, prompt, enhanced)
    if cache is not None:
        cache.put(key, {
            "instructions_version": INSTRUCTIONS_VERSION, "backend": backend_name, "model": enhancer.cache_id,
            "prompt": prompt, "caption": caption, "enhanced": enhanced,
        })
    return EnhanceResult(prompt=enhanced, enhanced=True, caption=caption, backend=backend_name)
