"""Reference preparation: the official crop/resize/EXIF order, the other fit modes, tensor conversion."""

import io

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from dsd_core.errors import InputError
from dsd_core.image import center_crop_box, load_image, pil_to_tensor, prepare_reference, tensor_to_pil
from dsd_core.tiny import reference_image


def official(image):
    """generate.py + diffusers.utils.load_image, written out."""
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((512, 512))
    return PIL.ImageOps.exif_transpose(image).convert("RGB")


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (512, 512), (301, 200), (200, 301), (1001, 999)])
def test_default_matches_official_preprocessing(size):
    im = reference_image(*size, seed=sum(size))
    assert np.array_equal(np.asarray(prepare_reference(im)), np.asarray(official(im)))


@pytest.mark.parametrize("w,h", [(640, 480), (301, 200), (7, 3), (3, 7), (100, 100)])
def test_square_crop_box_is_the_reference_formula(w, h):
    s = min(w, h)
    assert center_crop_box(w, h) == ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)


def test_exif_orientation_is_applied():
    im = reference_image(320, 240, seed=1)
    buf = io.BytesIO()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    buf.seek(0)
    path = io.BytesIO(buf.getvalue())
    loaded = PIL.Image.open(path).convert("RGB")
    assert np.array_equal(np.asarray(prepare_reference(loaded)), np.asarray(official(loaded)))
    # a non-square panel takes the displayed (rotated) orientation before cropping
    tall = prepare_reference(loaded, height=512, width=384)
    assert tall.size == (384, 512)


def test_fit_modes():
    im = reference_image(400, 200, seed=2)
    pad = prepare_reference(im, 256, 256, mode="pad", pad_color=(0, 255, 0))
    arr = np.asarray(pad)
    assert pad.size == (256, 256)
    assert (arr[0, 128] == [0, 255, 0]).all() and (arr[-1, 128] == [0, 255, 0]).all()  # bars top and bottom
    stretch = prepare_reference(im, 256, 128, mode="stretch")
    assert stretch.size == (128, 256)
    crop = prepare_reference(im, 256, 128, mode="center_crop")
    assert crop.size == (128, 256)
    with pytest.raises(InputError, match="unknown fit mode"):
        prepare_reference(im, mode="zoom")
    with pytest.raises(InputError, match="unknown resampling filter"):
        prepare_reference(im, resample="cubic")


def test_tensor_round_trip_is_lossless_for_8_bit_images():
    im = reference_image(64, 48, seed=3)
    t = pil_to_tensor(im)
    assert t.shape == (1, 48, 64, 3) and t.dtype == torch.float32
    assert np.array_equal(np.asarray(tensor_to_pil(t)[0]), np.asarray(im))
    with pytest.raises(InputError, match=r"\(B, H, W, C\)"):
        tensor_to_pil(torch.zeros(2, 3))


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "bad.png")
    reference_image(32, 32).convert("L").save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").mode == "RGB"
