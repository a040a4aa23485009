"""Prompt enhancement (project issue 4): rewrite a short prompt into a detailed one.

Two calls to a vision-language model, as in the official DSD code: caption the
reference image, then merge that caption into the user's prompt. Backends:
"gemini" (Gemini API via google-genai), "local" (a local transformers VLM
folder, see :mod:`dsd_core.prompt.local`) and "none".

    from dsd_core.prompt import enhance_prompt
    result = enhance_prompt(pil_image, "a photo of it on the beach")
    result.prompt   # enhanced prompt, or the original one on fallback
    result.warning  # None, or one sentence naming why it fell back

Importing this package never imports google-genai, google-generativeai or
transformers; they are loaded when a backend is used.
"""

from .api import BACKENDS, enhance_prompt
from .base import (
    CAPTION_INSTRUCTION,
    ENHANCE_INSTRUCTION,
    INSTRUCTIONS_VERSION,
    EnhanceError,
    EnhanceResult,
    build_enhance_instruction,
    clean_reply,
    prepare_reference,
)
from .cache import PromptCache, clear_memory_cache, default_cache_dir
from .gemini import DEFAULT_GEMINI_MODEL, GeminiEnhancer
from .local import RECOMMENDED_LOCAL_VLM, LocalVLMEnhancer, unload_local_models

__all__ = [
    "BACKENDS",
    "CAPTION_INSTRUCTION",
    "DEFAULT_GEMINI_MODEL",
    "ENHANCE_INSTRUCTION",
    "INSTRUCTIONS_VERSION",
    "RECOMMENDED_LOCAL_VLM",
    "EnhanceError",
    "EnhanceResult",
    "GeminiEnhancer",
    "LocalVLMEnhancer",
    "PromptCache",
    "build_enhance_instruction",
    "clean_reply",
    "clear_memory_cache",
    "default_cache_dir",
    "enhance_prompt",
    "prepare_reference",
    "unload_local_models",
]
