"""ComfyUI-native DSD: DSD on ComfyUI's own FLUX MODEL, CLIP, VAE, LoRA loaders and samplers.

Graph: UNETLoader (FLUX.1-dev or the DSD transformer; fp8/GGUF fine) -> LoraLoaderModelOnly (DSD LoRA, + any others)
-> **DSD Apply (native)** -> **DSD Guider**; DualCLIPLoader -> **DSD Text Encode** (prompt, and "" for the
negative); VAELoader + LoadImage -> **DSD Native Conditioning** (three conditionings + the empty canvas latent);
**DSD Scheduler** (the reference sigmas); SamplerCustomAdvanced (RandomNoise, KSamplerSelect euler) -> VAEDecode ->
**DSD Split Canvas**. The algorithms live in :mod:`dsd_core.native`; here only ComfyUI glue.
"""

from __future__ import annotations

import logging
import os

from . import _comfy
from .loader import _choices

logger = logging.getLogger(__name__)

#: ComfyUI's FLUX latent shift: a latent filled with it becomes exactly 0 after ``process_latent_in``.
FLUX_SHIFT_FACTOR = 0.1159
T5_REFERENCE_LENGTH = 512
PATCH_FOLDERS = ("unet", "dsd")  # the DSD transformer in models/diffusion_models, a patch in models/dsd
DEFAULT_PATCH = "dsd_c_embedder.safetensors"
_C_EMBEDDERS: dict = {}  # (path, mtime, size) -> CEmbedder


def _patch_files() -> list[str]:
    files = []
    for folder in PATCH_FOLDERS:
        files += [f for f in _comfy.filenames_with_extension(folder, ".safetensors") if f not in files]
    return files


def _patch_path(name: str) -> str:
    from dsd_core.errors import ModelNotFoundError

    for folder in PATCH_FOLDERS:
        path = _comfy.full_path(folder, name)
        if path is not None and os.path.isfile(path):
            return path
    raise ModelNotFoundError(f"{name} not found in models/diffusion_models or models/dsd; put the DSD transformer file "
                             "or the c_embedder patch there (python -m dsd_core extract-c-embedder makes the patch).")


def load_c_embedder(path: str):
    from dsd_core.native import read_c_embedder

    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _C_EMBEDDERS:
        _C_EMBEDDERS.clear()
        _C_EMBEDDERS[key] = read_c_embedder(path)
    return _C_EMBEDDERS[key]


def _effective_img_in_shape(model, key: str):
    """``img_in.weight``'s shape after this MODEL's patches (from the config: the live tensor may hold another clone's
    patched weight while that clone is loaded)."""
    import torch

    cfg = model.model.model_config.unet_config
    patch = cfg.get("patch_size", 2)
    shape = (cfg["hidden_size"], cfg["in_channels"] * patch * patch)
    for p in model.patches.get(key, ()):
        v = p[1]
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "diff" and len(v[1]) > 1 and \
                isinstance(v[1][1], dict) and v[1][1].get("pad_weight"):
            shape = tuple(v[1][0].shape)
        elif not isinstance(v, tuple):  # weight adapters (e.g. a control LoRA's reshape_weight)
            try:
                import comfy.lora

                shape = tuple(comfy.lora.calculate_shape([p], torch.empty(shape, device="meta"), key))
            except Exception:  # noqa: BLE001 - older ComfyUI: no adapters that change shapes
                pass
    return shape


class DSDApplyNative:
    DESCRIPTION = ("Makes a FLUX.1-dev MODEL from ComfyUI's loaders a DSD model: widens img_in with DSD's c_embedder "
                   "(read from the DSD transformer file, or from the small patch made by `python -m dsd_core "
                   "extract-c-embedder`), so the condition latent of DSD Native Conditioning is added to the image "
                   "tokens exactly as in DSD. Load the DSD LoRA with LoraLoaderModelOnly as usual.")
    CATEGORY = "DSD/native"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A FLUX.1-dev model (UNETLoader, any weight dtype; GGUF loaders too)."}),
            "c_embedder_file": (_choices(DEFAULT_PATCH, _patch_files()), {
                "default": DEFAULT_PATCH,
                "tooltip": "The DSD transformer (models/diffusion_models) or the c_embedder patch (models/dsd)."}),
        }}

    def apply(self, model, c_embedder_file):
        import comfy.model_base

        from dsd_core.errors import InputError
        from dsd_core.native import img_in_patch

        inner = getattr(model.model, "diffusion_model", None)
        if not isinstance(model.model, comfy.model_base.Flux) or inner is None or not hasattr(inner, "img_in") \
                or getattr(inner, "patch_size", None) != 2:
            raise InputError(f"DSD Apply needs a FLUX.1 model, got {type(model.model).__name__}; load FLUX.1-dev "
                             "(or the DSD transformer) with the diffusion model loader.")
        emb = load_c_embedder(_patch_path(c_embedder_file))
        key = "diffusion_model.img_in.weight"
        patch = img_in_patch(_effective_img_in_shape(model, key), emb)
        m = model.clone()
        m.add_patches({key: ("diff", (patch.weight, {"pad_weight": True})),
                       "diffusion_model.img_in.bias": ("diff", (patch.bias,))}, 1.0, 1.0)
        return (m,)


class DSDTextEncode:
    DESCRIPTION = ("Encodes a prompt with FLUX's CLIP-L + T5 like the DSD reference: the prompt is stripped and its "
                   "newlines deleted, and T5 is padded to 512 tokens (ComfyUI pads to 256; T5 runs unmasked, so the "
                   "padding changes the embeddings). Use it for the prompt and, with an empty text, the negative.")
    CATEGORY = "DSD/native"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "prompt_used")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "prompt": ("STRING", {"multiline": True, "default": "this character playing soccer"}),
            "t5_padding": ([str(T5_REFERENCE_LENGTH), "comfyui"], {
                "default": str(T5_REFERENCE_LENGTH),
                "tooltip": "512: pad T5 to 512 tokens as the reference does; comfyui: ComfyUI's 256."}),
        }}

    def encode(self, clip, prompt, t5_padding=str(T5_REFERENCE_LENGTH)):
        from dsd_core.pipeline import clean_prompt

        text = clean_prompt(prompt)
        clip = clip.clone()
        if t5_padding != "comfyui":
            set_t5_min_length(clip, int(t5_padding))
        tokens = clip.tokenize(text)
        if hasattr(clip, "encode_from_tokens_scheduled"):
            return (clip.encode_from_tokens_scheduled(tokens), text)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return ([[cond, {"pooled_output": pooled}]], text)


def set_t5_min_length(clip, length: int) -> None:
    """Make ``clip.tokenize`` pad T5 to ``length`` tokens (ComfyUI's ``t5xxl_min_length`` tokenizer option)."""
    from dsd_core.errors import InputError

    if not hasattr(getattr(clip, "tokenizer", None), "t5xxl"):
        raise InputError("DSD Text Encode needs FLUX's text encoders (DualCLIPLoader type flux: clip_l + t5xxl); "
                         "this CLIP has no T5-XXL tokenizer.")
    if hasattr(clip, "set_tokenizer_option"):
        clip.set_tokenizer_option("t5xxl_min_length", length)
    else:  # older ComfyUI: the option does not exist; set it on the (cloned) CLIP's own tokenizer copy
        import copy

        clip.tokenizer = copy.copy(clip.tokenizer)
        clip.tokenizer.t5xxl = copy.copy(clip.tokenizer.t5xxl)
        clip.tokenizer.t5xxl.min_length = length


class DSDNativeConditioning:
    DESCRIPTION = ("Builds DSD's inputs for ComfyUI's samplers: the reference is fitted to the left panel of a "
                   "black 1x2 canvas and VAE-encoded (posterior mode); that condition latent rides on the "
                   "conditionings as concat_latent_image. Outputs the normal conditioning (prompt + reference), "
                   "image_only (negative text + reference) and unconditional (negative text + zero condition) for "
                   "DSD Guider, and the empty canvas latent.")
    CATEGORY = "DSD/native"
    FUNCTION = "build"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "image_only", "unconditional", "latent")

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core.image import FIT_MODES

        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING", {"tooltip": "The empty prompt, encoded (reference: \"\")."}),
            "vae": ("VAE",),
            "image": ("IMAGE", {"tooltip": "The reference; the first image of a batch is used."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 20.0, "step": 0.1,
                                   "tooltip": "FLUX distilled guidance, set on all three conditionings (3.5)."}),
            "panel_size": ("INT", {"default": 512, "min": 256, "max": 1024, "step": 16,
                                   "tooltip": "Side of each panel; the canvas is panel_size x 2*panel_size."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 16}),
            "fit": (list(FIT_MODES), {"default": "center_crop"}),
        }}

    def build(self, positive, negative, vae, image, guidance, panel_size, batch_size, fit="center_crop"):
        import torch

        from dsd_core import canvas as cv
        from dsd_core.errors import InputError
        from dsd_core.image import pil_to_tensor, prepare_reference, tensor_to_pil

        cv.check_canvas_size(panel_size, 2 * panel_size)
        if image.shape[0] > 1:
            logger.warning("DSD Native Conditioning got %d reference images; using the first.", image.shape[0])
        reference = pil_to_tensor(prepare_reference(tensor_to_pil(image[:1])[0], panel_size, panel_size, mode=fit))
        # the condition canvas in ComfyUI's [0, 1] pixels: reference left, black right (-1 after the VAE's 2x - 1,
        # the same float ops as the reference's x/255 * 2 - 1)
        pixels = torch.cat([reference, torch.zeros_like(reference)], dim=2)
        latent = vae.encode(pixels)
        if latent.ndim != 4 or latent.shape[1] != 16:
            raise InputError(f"the VAE gave a latent of shape {tuple(latent.shape)}; DSD needs the FLUX VAE "
                             "(16 channels), e.g. ae.safetensors.")
        zero = torch.full_like(latent, FLUX_SHIFT_FACTOR)  # becomes exactly 0 after process_latent_in
        extra = {"guidance": guidance}
        pos = _set_values(positive, dict(extra, concat_latent_image=latent))
        image_only = _set_values(negative, dict(extra, concat_latent_image=latent))
        uncond = _set_values(negative, dict(extra, concat_latent_image=zero))
        empty = torch.zeros((batch_size, 16, latent.shape[2], latent.shape[3]), dtype=torch.float32)
        return (pos, image_only, uncond, {"samples": empty})


def _set_values(conditioning, values: dict):
    out = []
    for t in conditioning:
        d = t[1].copy()
        d.update(values)
        out.append([t[0], d])
    return out


def _sigma_index(sigmas, timestep) -> int:
    t = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)
    return int((sigmas.float().cpu() - t).abs().argmin())


def make_guider_class():
    import comfy.samplers

    from dsd_core.errors import InputError
    from dsd_core.guidance import TrueGuidance, combine

    class DSDCFGGuider(comfy.samplers.CFGGuider):
        """DSD's true guidance on ComfyUI's sampling: the reference formula and both gates.

        ``out = u + s_i (ui - u) + s_t (c - ui)`` on the denoised predictions, which equals the reference's combination
        of velocities (the weights sum to 1). Only ``c`` is evaluated when ``s_i <= 1`` or outside the step window.
        """

        def set_guidance(self, guidance: TrueGuidance):
            self.dsd = guidance
            self.checked = False

        def set_conds(self, positive, image_only, unconditional):
            self.inner_set_conds({"positive": positive, "image_only": image_only, "negative": unconditional})

        def check_conds(self):
            for name in ("positive", "image_only", "negative"):
                for c in self.conds.get(name) or []:
                    if c.get("concat_latent_image") is None:
                        what = {"negative": "unconditional"}.get(name, name)
                        raise InputError(f"DSD Guider: the {what} conditioning carries no DSD condition latent; connect "
                                         "the three outputs of DSD Native Conditioning to positive, image_only and "
                                         "unconditional.")
                    if "c_concat" not in c.get("model_conds", {"c_concat": None}):
                        raise InputError("DSD Guider: the model ignores the condition latent (its img_in is not "
                                         "widened); put DSD Apply (native) between the model loader and the guider.")
            self.checked = True

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            if not self.checked:
                self.check_conds()
            sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
            step = _sigma_index(sigmas, timestep) if sigmas is not None else 0
            positive = self.conds.get("positive")
            if not self.dsd.active(step):
                return comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, model_options)[0]
            c, ui, u = comfy.samplers.calc_cond_batch(
                self.inner_model, [positive, self.conds.get("image_only"), self.conds.get("negative")], x, timestep,
                model_options)
            return combine(c, ui, u, self.dsd.image_scale, self.dsd.text_scale)

    return DSDCFGGuider


class DSDGuider:
    DESCRIPTION = ("DSD's true guidance for SamplerCustomAdvanced: u + s_i (ui - u) + s_t (c - ui), as in the "
                   "reference, only when image_guidance > 1 and from start_step (2) on; otherwise one pass per step. "
                   "text_guidance only acts when image_guidance > 1, as in the reference.")
    CATEGORY = "DSD/native"
    FUNCTION = "get_guider"
    RETURN_TYPES = ("GUIDER",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "image_only": ("CONDITIONING",),
            "unconditional": ("CONDITIONING",),
            "image_guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                         "tooltip": "s_i; > 1 turns on true guidance (1.5 in the official demo)."}),
            "text_guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "s_t; only acts when image_guidance > 1."}),
            "start_step": ("INT", {"default": 2, "min": 0, "max": 10000,
                                   "tooltip": "First step with true guidance (reference 2)."}),
            "end_step": ("INT", {"default": -1, "min": -1, "max": 10000,
                                 "tooltip": "First step without it again; -1 = to the end (reference)."}),
        }}

    def get_guider(self, model, positive, image_only, unconditional, image_guidance, text_guidance, start_step,
                   end_step):
        from dsd_core.errors import InputError
        from dsd_core.guidance import TrueGuidance

        try:
            guidance = TrueGuidance(image_guidance, text_guidance, start_step, None if end_step < 0 else end_step)
        except ValueError as e:
            raise InputError(f"DSD Guider: {e}.") from None
        guider = make_guider_class()(model)
        guider.set_conds(positive, image_only, unconditional)
        guider.set_guidance(guidance)
        return (guider,)


class DSDScheduler:
    DESCRIPTION = ("The reference's sigmas: linspace(1, 1/steps, steps) shifted with the mu of the canvas' token "
                   "count (0.8033 at 512x1024), then 0. ComfyUI's FLUX shift and 'simple' scheduler differ slightly.")
    CATEGORY = "DSD/native"
    FUNCTION = "get_sigmas"
    RETURN_TYPES = ("SIGMAS",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 28, "min": 1, "max": 200}),
            "panel_size": ("INT", {"default": 512, "min": 256, "max": 1024, "step": 16}),
        }}

    def get_sigmas(self, steps, panel_size):
        from dsd_core import canvas as cv
        from dsd_core.native import reference_sigmas

        cv.check_canvas_size(panel_size, 2 * panel_size)
        return (reference_sigmas(steps, cv.num_image_tokens(panel_size, 2 * panel_size)),)


class DSDSplitCanvas:
    DESCRIPTION = "Splits decoded DSD canvases into the result (right panel) and the reference reconstruction (left)."
    CATEGORY = "DSD/native"
    FUNCTION = "split"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("images", "reference_reconstruction")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"canvas": ("IMAGE",)}}

    def split(self, canvas):
        from dsd_core.canvas import split_canvas

        left, right = split_canvas(canvas.movedim(-1, 1))
        return (right.movedim(1, -1).contiguous(), left.movedim(1, -1).contiguous())


NODE_CLASS_MAPPINGS = {
    "DSDApplyNative": DSDApplyNative,
    "DSDTextEncode": DSDTextEncode,
    "DSDNativeConditioning": DSDNativeConditioning,
    "DSDGuider": DSDGuider,
    "DSDScheduler": DSDScheduler,
    "DSDSplitCanvas": DSDSplitCanvas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DSDApplyNative": "DSD Apply (native)",
    "DSDTextEncode": "DSD Text Encode",
    "DSDNativeConditioning": "DSD Native Conditioning",
    "DSDGuider": "DSD Guider",
    "DSDScheduler": "DSD Scheduler",
    "DSDSplitCanvas": "DSD Split Canvas",
}
