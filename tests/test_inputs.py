"""Input checks shared by the nodes: panel sizes, prompt truncation, reference upscaling - and the nodes telling."""

from __future__ import annotations

import logging

import pytest
import torch

import nodes
from dsd_core.errors import InputError
from dsd_core.image import pil_to_tensor
from dsd_core.tiny import reference_image
from dsd_core.inputs import (PANEL_SIZE, check_panel_size, prompt_token_counts, reference_notes,
                             reference_upscale)


def test_image_prep_and_sampler_accept_the_same_panel_sizes():
    prep = nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"].INPUT_TYPES()["required"]["panel_size"][1]
    sampler = nodes.NODE_CLASS_MAPPINGS["DSDSampler"].INPUT_TYPES()["required"]["panel_size"][1]
    keys = ("default", "min", "max", "step")
    assert {k: prep[k] for k in keys} == {k: sampler[k] for k in keys} == PANEL_SIZE


@pytest.mark.parametrize("size", [64, 256, 512, 768, 2048])
def test_valid_panel_sizes(size):
    assert check_panel_size(size) == size


@pytest.mark.parametrize("size", [500, 520, 48, 2064, 0, -512, 512.0, True])
def test_invalid_panel_sizes_say_what_is_valid(size):
    with pytest.raises(InputError, match=r"multiple of 16 from 64 to 2048"):
        check_panel_size(size)


def test_image_prep_rejects_what_the_sampler_rejects():
    """Over the API ComfyUI checks min/max only, not step: 500 used to pass Image Prep and fail in the Sampler."""
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(InputError, match="panel_size 500"):
        nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"]().prepare(image, "center_crop", "bicubic", 500, "white")


def test_prompt_token_counts(tiny_pipe):
    short = prompt_token_counts(tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, "a cat on a red chair")
    assert not short.truncated and short.notes() == []
    assert 3 <= short.clip <= 77 and short.clip_limit == 77 and short.t5_limit == 512
    long = prompt_token_counts(tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, "a cat on a red chair " * 150)
    assert long.truncated and long.clip > 77 and long.t5 > 512
    notes = long.notes()
    assert len(notes) == 2 and "T5 reads the first 512" in notes[0] and "CLIP-L reads the first 77" in notes[1]
    clip_only = prompt_token_counts(tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, "a cat on a red chair " * 20)
    assert clip_only.clip > 77 and clip_only.t5 <= 512
    assert [n.split(":")[0] for n in clip_only.notes()] == ["prompt truncated for CLIP"]
    assert prompt_token_counts(tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, "cat " * 100, 64).notes()[0].startswith(
        "prompt truncated: it is")


def test_reference_upscale_factor():
    assert reference_upscale((1, 1), (512, 512)) == 512
    assert reference_upscale((1024, 100), (512, 512)) == pytest.approx(5.12)  # center_crop fills: short side counts
    assert reference_upscale((1024, 100), (512, 512), "pad") == 0.5  # pad fits: long side counts
    assert reference_notes((256, 256), (512, 512)) == []
    (note,) = reference_notes((1, 1), (512, 512))
    assert note.startswith("reference upscaled 512.0x: it is 1x1 px") and "at least 256 px" in note


def _sample(handle, image, prompt):
    return nodes.NODE_CLASS_MAPPINGS["DSDSampler"]().sample(
        handle, image, prompt=prompt, seed=0, steps=1, guidance=3.5, image_guidance=1.0, text_guidance=1.0,
        panel_size=64, batch_size=1, lora_scale=1.0)


class _Handle:
    """A loaded-model handle around the session's tiny pipeline (the sampler only calls get() and spec.device)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.spec = type("Spec", (), {"device": "cpu"})()

    def get(self):
        return self.pipe


def test_sampler_tells_about_a_tiny_reference_and_a_cut_prompt(tiny_pipe, caplog):
    handle = _Handle(tiny_pipe)
    quiet = _sample(handle, pil_to_tensor(reference_image(64, 64)), "a cat on a red chair")
    assert "ui" not in quiet and quiet["result"][3] == "" and len(quiet["result"]) == 4
    with caplog.at_level(logging.WARNING):
        out = _sample(handle, torch.rand(1, 1, 1, 3), "a cat on a red chair " * 150)
    notes = out["ui"]["text"]
    assert [n.split(":")[0] for n in notes] == ["reference upscaled 64.0x", "prompt truncated",
                                                "prompt truncated for CLIP"]
    assert out["result"][3] == "\n".join(notes)
    assert out["result"][0].shape == (1, 64, 64, 3)
    assert sum("DSD Sampler: " in r.getMessage() for r in caplog.records) == 3


def test_image_prep_tells_about_upscaling():
    out = nodes.NODE_CLASS_MAPPINGS["DSDImagePrep"]().prepare(torch.rand(2, 8, 8, 3), "center_crop", "bicubic", 512,
                                                              "white")
    assert out["result"][0].shape == (2, 512, 512, 3)
    assert out["ui"]["text"] == ["reference upscaled 64.0x: it is 8x8 px and the panel 512x512; the subject's details "
                                 "are invented, not kept. Use a reference of at least 256 px."]
