"""ComfyUI node "DSD Prompt Enhancer": a thin adapter over ``dsd_core.prompt.enhance_prompt``.

V1 node API. Nothing from ComfyUI (``comfy``, ``folder_paths``) is imported at
module level, and the module imports fine without google-genai. There is
deliberately no API-key widget: widget values are saved into workflows and
PNG metadata, so the key comes only from the environment (see DESCRIPTION).
"""

from __future__ import annotations

import logging
import os

from dsd_core.image import tensor_to_pil
from dsd_core.prompt import BACKENDS, DEFAULT_GEMINI_MODEL, enhance_prompt  # registered by the pack's __init__

logger = logging.getLogger(__name__)


def _tensor_to_pil(image):
    """First image of a ComfyUI IMAGE tensor ([B,H,W,C] float 0..1) as an RGB PIL image."""
    return tensor_to_pil(image[:1] if image.ndim == 4 else image)[0]


def _resolve_local_model(path: str) -> str | None:
    """A folder path as given, or a name looked up under ComfyUI's models/ and models/LLM/ folders."""
    path = (path or "").strip()
    if not path:
        return None
    if os.path.isabs(path) or os.path.isdir(path):
        return path
    try:
        import folder_paths  # ComfyUI, imported only when running inside it

        for candidate in (os.path.join(folder_paths.models_dir, "LLM", path),
                          os.path.join(folder_paths.models_dir, path)):
            if os.path.isdir(candidate):
                return candidate
    except ImportError:
        pass
    return path


class DSDPromptEnhancer:
    """Rewrite a short prompt into a detailed one from the reference image (Gemini, a local VLM, or off)."""

    DESCRIPTION = (
        "Rewrites your prompt into a detailed one using the reference image, as the official DSD code does: "
        "the model first captions the image, then merges that caption into your prompt (keeping what your "
        "prompt says). On any problem (no key, network, quota, blocked reply...) the original prompt is passed "
        "through and a warning is logged. Gemini API key: set the GEMINI_API_KEY or GOOGLE_API_KEY environment "
        "variable, or DSD_GEMINI_KEY_FILE to the path of a file holding the key, before starting ComfyUI. There "
        "is no key widget on purpose: widget values are saved in workflows and image metadata. Vertex AI: set "
        "GOOGLE_GENAI_USE_VERTEXAI=true, GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION. Backend 'local' runs a "
        "vision-language model from a folder (e.g. HuggingFaceTB/SmolVLM-Instruct downloaded into models/LLM). "
        "Results are cached on disk."
    )
    CATEGORY = "DSD/prompt"
    FUNCTION = "enhance"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "caption")
    OUTPUT_TOOLTIPS = ("The enhanced prompt, or your prompt unchanged if enhancement was off or failed.",
                       "The model's caption of the reference image (empty if none).")
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Reference image; the first one of a batch is used."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "Your prompt, e.g. 'this character surfing a big wave'."}),
                "backend": (list(BACKENDS), {"default": "gemini",
                                             "tooltip": "gemini: Gemini API; local: a local VLM folder; none: off."}),
                "model": ("STRING", {"default": DEFAULT_GEMINI_MODEL,
                                     "tooltip": "Gemini model name (empty: DSD_GEMINI_MODEL or the default)."}),
            },
            "optional": {
                "local_model": ("STRING", {"default": "",
                                           "tooltip": "Backend 'local': model folder path, or a folder name "
                                                      "under models/LLM or models/."}),
            },
        }

    def enhance(self, image, prompt, backend, model, local_model=""):
        result = enhance_prompt(
            _tensor_to_pil(image), prompt, backend=backend, model=model,
            local_model_path=_resolve_local_model(local_model) if backend == "local" else None,
        )
        ui = {"text": [result.prompt]}
        if result.warning:
            ui["warning"] = [result.warning]
        return {"ui": ui, "result": (result.prompt, result.caption or "")}


NODE_CLASS_MAPPINGS = {"DSDPromptEnhancer": DSDPromptEnhancer}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDPromptEnhancer": "DSD Prompt Enhancer"}
