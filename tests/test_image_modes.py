"""Every Pillow mode becomes the right RGB picture (dsd_core.image.to_rgb): 16/32-bit and float grayscale scaled,
not clipped to white; transparent areas composited on the stated background, not the colour stored under them."""

import io

import numpy as np
import PIL.Image
import pytest

from dsd_core.image import BACKGROUND, load_image, pil_to_tensor, prepare_reference, to_rgb


def _gray16(mode, values):
    arr = np.array([values], dtype=">u2" if mode == "I;16B" else "<u2")
    return PIL.Image.frombytes(mode, (len(values), 1), arr.tobytes())


def _rgba(pixels):
    im = PIL.Image.new("RGBA", (len(pixels), 1))
    im.putdata(pixels)
    return im


def _pal(mode):
    im = PIL.Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1])
    if mode == "PA":
        im = im.convert("PA")
        im.putdata([(0, 255), (1, 0)])
    else:
        im.info["transparency"] = 1
    return im


W = BACKGROUND
# mode -> (image, expected RGB pixels)
CASES = {
    "1": (PIL.Image.frombytes("1", (8, 1), bytes([0b10000000])), [(255, 255, 255)] + [(0, 0, 0)] * 7),
    "L": (PIL.Image.frombytes("L", (2, 1), bytes([0, 200])), [(0, 0, 0), (200, 200, 200)]),
    "LA": (PIL.Image.frombytes("LA", (2, 1), bytes([50, 255, 0, 0])), [(50, 50, 50), W]),
    "La": (PIL.Image.frombytes("La", (2, 1), bytes([50, 255, 0, 0])), [(50, 50, 50), W]),
    "P": (_pal("P"), [(255, 0, 0), W]),  # palette index 1 is the transparency key
    "PA": (_pal("PA"), [(255, 0, 0), W]),
    "RGB": (PIL.Image.frombytes("RGB", (1, 1), bytes([1, 2, 3])), [(1, 2, 3)]),
    "RGBA": (_rgba([(255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 0, 128)]), [(255, 0, 0), W, (127, 127, 127)]),
    "RGBa": (PIL.Image.frombytes("RGBa", (2, 1), bytes([200, 0, 0, 255, 0, 0, 0, 0])), [(200, 0, 0), W]),
    "RGBX": (PIL.Image.frombytes("RGBX", (1, 1), bytes([9, 8, 7, 0])), [(9, 8, 7)]),
    "CMYK": (PIL.Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 0, 255, 255, 0])), [(255, 255, 255),
                                                                                         (255, 0, 0)]),
    "I;16": (_gray16("I;16", [0, 65535, 257 * 100]), [(0, 0, 0), (255, 255, 255), (100, 100, 100)]),
    "I;16B": (_gray16("I;16B", [0, 65535, 257 * 100]), [(0, 0, 0), (255, 255, 255), (100, 100, 100)]),
    "I;16L": (_gray16("I;16L", [65535, 257 * 7]), [(255, 255, 255), (7, 7, 7)]),
    "I (16-bit values)": (PIL.Image.fromarray(np.array([[0, 65535, 257 * 50]], dtype=np.int32), "I"),
                          [(0, 0, 0), (255, 255, 255), (50, 50, 50)]),
    "I (8-bit values)": (PIL.Image.fromarray(np.array([[0, 255, 60]], dtype=np.int32), "I"),
                         [(0, 0, 0), (255, 255, 255), (60, 60, 60)]),
    "F (0..1)": (PIL.Image.fromarray(np.array([[0.0, 1.0, 0.2]], dtype=np.float32), "F"),
                 [(0, 0, 0), (255, 255, 255), (51, 51, 51)]),
    "F (0..255)": (PIL.Image.fromarray(np.array([[0.0, 255.0, 60.0]], dtype=np.float32), "F"),
                   [(0, 0, 0), (255, 255, 255), (60, 60, 60)]),
}
# modes whose RGB meaning is Pillow's own conversion (colour spaces)
PILLOW_CONVERTED = ["YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_converts_to_the_right_rgb(case):
    image, expected = CASES[case]
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    got = [tuple(int(c) for c in px) for px in np.asarray(out).reshape(-1, 3)]
    assert all(max(abs(a - b) for a, b in zip(g, e)) <= 1 for g, e in zip(got, expected)), (got, expected)


@pytest.mark.parametrize("mode", PILLOW_CONVERTED)
def test_colour_space_modes_use_pillows_conversion(mode):
    image = PIL.Image.new("RGB", (4, 2), (30, 160, 220)).convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_background_is_a_stated_choice():
    out = to_rgb(_rgba([(0, 0, 0, 0)]), background=(0, 128, 0))
    assert out.getpixel((0, 0)) == (0, 128, 0)


def _png(image) -> io.BytesIO:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    buf.seek(0)
    return buf


def test_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(ramp).save(path)  # Pillow writes (and reads) it as I;16
    assert PIL.Image.open(path).mode.startswith("I")
    got = np.asarray(load_image(path))[..., 0].astype(np.float64)
    want = ramp / 257.0
    assert np.abs(got - want).max() <= 1 and (got == 255).mean() < 0.01  # not 99.6 % pure white


def test_transparent_png_shows_the_background_not_the_hidden_colour(tmp_path):
    arr = np.zeros((32, 32, 4), dtype=np.uint8)  # black stored under full transparency
    arr[8:24, 8:24] = (255, 0, 0, 255)
    path = tmp_path / "alpha.png"
    PIL.Image.fromarray(arr, "RGBA").save(path)
    got = np.asarray(load_image(path))
    assert tuple(got[0, 0]) == BACKGROUND and tuple(got[16, 16]) == (255, 0, 0)
    prepared = np.asarray(prepare_reference(PIL.Image.open(path), 64, 64))
    assert tuple(prepared[0, 0]) == BACKGROUND
    assert tuple(pil_to_tensor(PIL.Image.open(path))[0, 0, 0].tolist()) == (1.0, 1.0, 1.0)
