"""Reference-image preparation: fit any picture into one panel of the DSD canvas.

The reference (official ``generate.py``) opens the file, converts to RGB, center-crops to a square with
floor-division offsets, resizes to 512x512 with Pillow's default filter (bicubic), then applies the EXIF
orientation (``diffusers.utils.load_image``). ``prepare_reference(image)`` with the defaults does exactly that.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from . import options
from .errors import InputError

FIT_MODES = tuple(options.FIT_MODES)
#: Pillow filters by the names in :data:`dsd_core.options.RESAMPLE_FILTERS`.
RESAMPLE_FILTERS = {name: PIL.Image.Resampling[name.upper()] for name in options.RESAMPLE_FILTERS}


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as RGB, as the reference CLI does (EXIF orientation is applied later, in prepare)."""
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"reference image {path} does not exist; pass the path of a PNG/JPEG/WebP file.") from None
    except PIL.UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read; pass a PNG, JPEG or WebP file.") from None


def center_crop_box(width: int, height: int, aspect: float = 1.0) -> tuple[int, int, int, int]:
    """Largest centered box of ``aspect`` (w/h) inside ``width x height``, with the reference's floor offsets."""
    if width / height > aspect:  # too wide: crop x
        cw, ch = max(1, round(height * aspect)), height
    else:
        cw, ch = width, max(1, round(width / aspect))
    return ((width - cw) // 2, (height - ch) // 2, (width + cw) // 2, (height + ch) // 2)


def prepare_reference(
    image: PIL.Image.Image,
    height: int = 512,
    width: int = 512,
    mode: str = "center_crop",
    resample: str = "bicubic",
    pad_color: Sequence[int] = (255, 255, 255),
) -> PIL.Image.Image:
    """Fit ``image`` into a ``width x height`` panel.

    mode:
        ``center_crop`` (reference): crop the centered box of the panel's aspect ratio, then resize.
        ``pad``: resize to fit inside the panel keeping the aspect ratio, fill the rest with ``pad_color``.
        ``stretch``: resize to the panel size, ignoring the aspect ratio.
    resample: a Pillow filter name; ``bicubic`` is Pillow's default and the reference's.

    EXIF orientation is applied after resizing for square panels (the reference order) and before for
    non-square ones, where rotating afterwards would swap the panel's sides.
    """
    if mode not in FIT_MODES:
        raise InputError(f"unknown fit mode {mode!r}; use one of {', '.join(FIT_MODES)}.")
    if resample not in RESAMPLE_FILTERS:
        raise InputError(f"unknown resampling filter {resample!r}; use one of {', '.join(RESAMPLE_FILTERS)}.")
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; use load_image() or tensor_to_pil().")
    filt = RESAMPLE_FILTERS[resample]
    square = height == width
    image = image.convert("RGB")
    if not square:
        image = PIL.ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if mode == "center_crop":
        image = image.crop(center_crop_box(w, h, width / height)).resize((width, height), filt)
    elif mode == "stretch":
        image = image.resize((width, height), filt)
    else:
        scale = min(width / w, height / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = PIL.Image.new("RGB", (width, height), tuple(int(c) for c in pad_color))
        canvas.paste(image.resize((nw, nh), filt), ((width - nw) // 2, (height - nh) // 2))
        image = canvas
    if square:
        image = PIL.ImageOps.exif_transpose(image).convert("RGB")
    return image


def pil_to_tensor(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL image(s) -> float32 ``(B, H, W, 3)`` in [0, 1] (ComfyUI's IMAGE layout)."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """float ``(B, H, W, C)`` or ``(H, W, C)`` in [0, 1] -> list of RGB PIL images (rounded to uint8)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected an image tensor of shape (B, H, W, C), got {tuple(images.shape)}.")
    arr = (images[..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return [PIL.Image.fromarray(a) for a in arr]
