"""DSD Image Prep: fit reference images into one DSD panel (center crop like the reference, pad, or stretch)."""

from __future__ import annotations

import logging

from . import _comfy

logger = logging.getLogger(__name__)
PAD_COLORS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


class DSDImagePrep:
    DESCRIPTION = ("Fits the reference into a square panel of panel_size: center_crop (the official DSD preprocessing), "
                   "pad (keep the whole picture, fill the rest) or stretch. The DSD Sampler does center_crop itself "
                   "when the image is not panel-sized; use this node to choose otherwise or to see the result.")
    CATEGORY = "DSD/image"
    FUNCTION = "prepare"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        from dsd_core import options as o
        from dsd_core.inputs import PANEL_SIZE

        return {"required": {
            "image": ("IMAGE",),
            "fit": (list(o.FIT_MODES), {"default": "center_crop",
                                        "tooltip": "; ".join(f"{k}: {v}" for k, v in o.FIT_MODES.items())}),
            "resample": (list(o.RESAMPLE_FILTERS), {"default": "bicubic",
                                                    "tooltip": "bicubic is Pillow's default and the reference's."}),
            "panel_size": ("INT", {**PANEL_SIZE,
                                   "tooltip": "Side of the square panel (the DSD Sampler accepts the same sizes); "
                                              f"DSD was trained at {o.PANEL}."}),
            "pad_color": (list(PAD_COLORS), {"default": "white", "tooltip": "Fill colour for fit = pad."}),
        }}

    @_comfy.user_errors
    def prepare(self, image, fit, resample, panel_size, pad_color):
        from dsd_core.image import pil_to_tensor, prepare_reference, tensor_to_pil
        from dsd_core.inputs import check_panel_size, reference_notes

        check_panel_size(panel_size)
        images = tensor_to_pil(image)
        notes = sorted({n for im in images for n in reference_notes(im.size, (panel_size, panel_size), fit)})
        for note in notes:
            logger.warning("DSD Image Prep: %s", note)
        out = [prepare_reference(im, panel_size, panel_size, mode=fit, resample=resample,
                                 pad_color=PAD_COLORS[pad_color]) for im in images]
        result = (pil_to_tensor(out),)
        return {"ui": {"text": notes}, "result": result} if notes else {"result": result}


NODE_CLASS_MAPPINGS = {"DSDImagePrep": DSDImagePrep}
NODE_DISPLAY_NAME_MAPPINGS = {"DSDImagePrep": "DSD Image Prep"}
