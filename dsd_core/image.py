"""Reference-image preparation: fit any picture into one panel of the DSD canvas.

Every Pillow mode is turned into RGB by :func:`to_rgb`: 16-bit and 32-bit grayscale are scaled (not clipped to white),
floats in [0, 1] or [0, 255] are scaled, and transparent areas are composited on a stated background (white, like the
``pad`` fill) instead of showing whatever colour is stored under them.

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


#: Background transparent areas are composited on (white, the ``pad`` fill; the reference's ``convert("RGB")``
#: would show the colour stored under transparent pixels, often black).
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: PIL.Image.Image, background: Sequence[int] = BACKGROUND) -> PIL.Image.Image:
    """Any Pillow image -> RGB (8 bit per channel), with correct scaling and alpha composited on ``background``.

    * 16-bit grayscale (``I;16*``) is scaled by 255/65535; 32-bit ``I`` the same when its values exceed 255 (16-bit
      PNGs opened by older Pillow), else taken as 8-bit values; ``F`` is taken as [0, 1] when its maximum is at most 1,
      else as [0, 255]; values outside the range are clipped.
    * modes with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``) and palette/grayscale/RGB images with a
      transparency key are composited on ``background`` (default white).
    * everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``) goes through Pillow's
      ``convert("RGB")``.
    """
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; use load_image() or tensor_to_pil().")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        info = image.info
        arr = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT or (image.mode == "I" and arr.size and arr.max() > 255):
            arr = arr * (255.0 / 65535.0)
        elif image.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        out = PIL.Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
        out.info.update({k: v for k, v in info.items() if k == "exif"})
        return out
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    if image.mode == "La":
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    base = PIL.Image.new("RGBA", rgba.size, tuple(int(c) for c in background) + (255,))
    out = PIL.Image.alpha_composite(base, rgba).convert("RGB")
    if "exif" in image.info:
        out.info["exif"] = image.info["exif"]
    return out


def load_image(path: str | os.PathLike, background: Sequence[int] = BACKGROUND) -> PIL.Image.Image:
    """Open an image file as RGB (see :func:`to_rgb`; EXIF orientation is applied later, in prepare).

    Every problem is an :class:`InputError` naming the file and the fix: missing, a folder, unreadable, not an
    image, truncated/damaged, or larger than Pillow's decompression-bomb limit.
    """
    try:
        with PIL.Image.open(path) as im:
            im.load()
            out = to_rgb(im, background)
            if "exif" in im.info and "exif" not in out.info:
                out.info["exif"] = im.info["exif"]
            if out is im:
                out = im.copy()
            return out
    except FileNotFoundError:
        raise InputError(f"reference image {path} does not exist; pass the path of a PNG/JPEG/WebP file.") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder; pass one image file (PNG/JPEG/WebP).") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied; make the file readable or copy it.") from None
    except PIL.UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read; pass a PNG, JPEG or WebP file.") from None
    except PIL.Image.DecompressionBombError as e:
        raise InputError(f"{path} is too large to open safely ({e.args[0].split('pixels')[0].strip()} pixels, "
                         f"Pillow's limit is {2 * (PIL.Image.MAX_IMAGE_PIXELS or 0)}); downscale it first (DSD uses "
                         "a 512x512 panel).") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path} is damaged or incomplete ({e}); re-export or download the image again.") from None


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
    from .validation import number

    height = number("height", height, minimum=1, integer=True)
    width = number("width", width, minimum=1, integer=True)
    if mode not in FIT_MODES:
        raise InputError(f"unknown fit mode {mode!r}; use one of {', '.join(FIT_MODES)}.")
    if resample not in RESAMPLE_FILTERS:
        raise InputError(f"unknown resampling filter {resample!r}; use one of {', '.join(RESAMPLE_FILTERS)}.")
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; use load_image() or tensor_to_pil().")
    filt = RESAMPLE_FILTERS[resample]
    square = height == width
    image = to_rgb(image, pad_color)
    if not square:
        image = to_rgb(PIL.ImageOps.exif_transpose(image))
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
        image = to_rgb(PIL.ImageOps.exif_transpose(image))
    return image


def pil_to_tensor(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL image(s) -> float32 ``(B, H, W, 3)`` in [0, 1] (ComfyUI's IMAGE layout)."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise InputError("no images given; pass at least one image.")
    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def tensor_to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """float ``(B, H, W, C)`` or ``(H, W, C)`` in [0, 1] -> list of RGB PIL images (rounded to uint8)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(f"expected an image tensor of shape (B, H, W, C), got {tuple(images.shape)}.")
    if 0 in images.shape:
        raise InputError(f"the image batch is empty (shape {tuple(images.shape)}); connect a node that outputs at "
                         "least one image.")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise InputError("the image contains NaN or infinite values; check the node that produced it.")
    arr = (images[..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return [PIL.Image.fromarray(a) for a in arr]
