"""Canvas layout, 2x2 packing, position ids and the timestep shift."""

import math

import pytest
import torch

from dsd_core import canvas as cv
from dsd_core.errors import InputError


def test_pack_unpack_round_trip_and_layout():
    lat = torch.randn(2, 16, 64, 128)
    packed = cv.pack_latents(lat)
    assert packed.shape == (2, 32 * 64, 64)
    assert torch.equal(cv.unpack_latents(packed, 512, 1024), lat)
    # token index r * 64 + c holds the 2x2 patch at latent rows 2r..2r+1, cols 2c..2c+1,
    # channel index ch * 4 + dy * 2 + dx
    r, c, ch, dy, dx = 5, 40, 3, 1, 0
    assert packed[1, r * 64 + c, ch * 4 + dy * 2 + dx] == lat[1, ch, 2 * r + dy, 2 * c + dx]


def test_left_and_right_half_tokens():
    lat = torch.zeros(1, 16, 64, 128)
    lat[..., 64:] = 1.0  # right half of the latent canvas
    packed = cv.pack_latents(lat).view(1, 32, 64, 64)
    assert packed[:, :, :32].abs().sum() == 0 and (packed[:, :, 32:] == 1).all()


def test_image_ids_are_row_major_and_shared():
    ids = cv.latent_image_ids(512, 1024)
    assert ids.shape == (2048, 3)
    assert ids[:, 0].abs().sum() == 0
    assert ids[64 * 7 + 33].tolist() == [0, 7, 33]
    assert cv.num_image_tokens(512, 1024) == 2048
    assert cv.num_image_tokens(768, 1536) == 4608


def test_mu_matches_reference_value():
    config = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    mu = cv.compute_mu(2048, config)
    assert mu == pytest.approx(0.80333, abs=1e-5)
    assert math.exp(mu) == pytest.approx(2.2330, abs=1e-4)
    # linear in the token count: the line through (256, 0.5) and (4096, 1.15)
    assert cv.compute_mu(256, config) == pytest.approx(0.5)
    assert cv.compute_mu(4096, config) == pytest.approx(1.15)


def test_condition_canvas_is_reference_left_black_right():
    ref = torch.rand(1, 3, 32, 48) * 2 - 1
    canvas = cv.build_condition_canvas(ref)
    assert canvas.shape == (1, 3, 32, 96)
    assert torch.equal(canvas[..., :48], ref)
    assert (canvas[..., 48:] == -1).all()
    left, right = cv.split_canvas(canvas)
    assert torch.equal(left, ref) and (right == -1).all()


@pytest.mark.parametrize("h,w", [(0, 1024), (500, 1024), (512, 1000), (512, 1008), (512, -1024)])
def test_invalid_canvas_sizes(h, w):
    with pytest.raises(InputError, match="multiple of 16"):
        cv.check_canvas_size(h, w)


@pytest.mark.parametrize("h,w", [(512, 1024), (256, 512), (512, 768), (768, 1536), (384, 1024)])
def test_valid_canvas_sizes(h, w):
    cv.check_canvas_size(h, w)
