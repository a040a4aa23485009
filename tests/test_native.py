"""The ComfyUI-native path's pieces that need no ComfyUI: c_embedder extraction, the padded img_in math, the reference
sigmas, the streaming transformer comparison and its CLI, and the native nodes that run without ComfyUI.
(The nodes on a real ComfyUI, against dsd_core: tests/engine/test_engine_native.py.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsd_core import native
from dsd_core.cli import main as cli
from dsd_core.errors import InputError, ModelFormatError, ModelNotFoundError
from dsd_core.tiny import COMFY_TRANSFORMER_CONFIG, build_components
from single_file_convert import transformer_to_bfl, write


@pytest.fixture(scope="module")
def dsd():
    return build_components(0)["dsd_transformer"]


@pytest.fixture(scope="module")
def files(dsd, tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    sd = dsd.state_dict()
    base = {k: v for k, v in sd.items() if not k.startswith("c_embedder.")}
    return {
        "dsd": write(d / "dsd.safetensors", sd),
        "dsd_bf16_bfl": write(d / "dsd_bfl.safetensors", transformer_to_bfl(sd, prefix="model.diffusion_model."),
                              dtype=torch.bfloat16),
        "flux_bfl": write(d / "flux1-dev.safetensors", transformer_to_bfl(base)),
        "flux": write(d / "flux.safetensors", base),
        "dir": d,
    }


def test_read_c_embedder_any_layout(dsd, files):
    want_w, want_b = dsd.c_embedder.weight.detach(), dsd.c_embedder.bias.detach()
    emb = native.read_c_embedder(files["dsd"])
    assert torch.equal(emb.weight, want_w) and torch.equal(emb.bias, want_b)
    emb = native.read_c_embedder(files["dsd_bf16_bfl"], dtype=None)  # BFL names under a prefix, bf16 kept
    assert emb.weight.dtype == torch.bfloat16 and torch.equal(emb.weight, want_w.bfloat16())


def test_read_c_embedder_errors(files, tmp_path):
    with pytest.raises(ModelFormatError, match="plain FLUX transformer without c_embedder"):
        native.read_c_embedder(files["flux_bfl"])
    with pytest.raises(ModelNotFoundError):
        native.read_c_embedder(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"c_embedder.weight": torch.zeros(8, 32), "c_embedder.bias": torch.zeros(8)}, str(bad))
    with pytest.raises(ModelFormatError, match=r"expected \(hidden, 64\)"):
        native.read_c_embedder(bad)
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(ModelFormatError, match="never pickle"):
        native.read_c_embedder(tmp_path / "x.ckpt")


def test_extract_writes_a_small_patch(dsd, files, tmp_path, capsys):
    out = tmp_path / "sub" / "dsd_c_embedder.safetensors"
    assert cli(["extract-c-embedder", files["dsd_bf16_bfl"], str(out)]) == 0
    assert "c_embedder (32, 64) bfloat16" in capsys.readouterr().out
    patch = load_file(str(out))
    assert set(patch) == {"c_embedder.weight", "c_embedder.bias"}
    assert torch.equal(patch["c_embedder.weight"], dsd.c_embedder.weight.detach().bfloat16())
    assert os.path.getsize(out) < 10_000
    assert not [f for f in os.listdir(out.parent) if f != out.name]  # no temp file left
    assert torch.equal(native.read_c_embedder(out).bias, dsd.c_embedder.bias.detach().bfloat16().float())
    with pytest.raises(InputError, match="safetensors"):
        native.extract_c_embedder(files["dsd"], tmp_path / "patch.pt")


def test_padded_img_in_equals_x_plus_c_embedder(dsd):
    """img_in([x; c]) with [W_x | W_c], b_x + b_c == x_embedder(x) + c_embedder(c) (ComfyUI's pad_weight diff)."""
    emb = native.CEmbedder(dsd.c_embedder.weight.detach(), dsd.c_embedder.bias.detach())
    w_x, b_x = dsd.x_embedder.weight.detach(), dsd.x_embedder.bias.detach()
    patch = native.img_in_patch(w_x.shape, emb)
    weight = torch.zeros_like(patch.weight)
    weight[:, : w_x.shape[1]] = w_x  # what pad_tensor_to_shape makes of the stored weight
    weight += patch.weight
    bias = b_x + patch.bias
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 10, 64, generator=g), torch.randn(2, 10, 64, generator=g)
    got = torch.nn.functional.linear(torch.cat([x, c], dim=-1), weight, bias)
    want = dsd.x_embedder(x) + dsd.c_embedder(c)
    assert (got - want).abs().max() < 1e-5  # float32 rounding of a different summation order


def test_img_in_patch_errors(dsd):
    emb = native.CEmbedder(dsd.c_embedder.weight.detach(), dsd.c_embedder.bias.detach(), "dsd.safetensors")
    with pytest.raises(InputError, match="already takes 32 latent channels"):
        native.img_in_patch((32, 128), emb)
    with pytest.raises(InputError, match="hidden size is 3072 but the c_embedder's is 32"):
        native.img_in_patch((3072, 64), emb)
    with pytest.raises(InputError, match="img_in takes 48 inputs"):
        native.img_in_patch((32, 48), emb)


def test_reference_sigmas():
    s = native.reference_sigmas(28, 2048)
    assert s.dtype == torch.float32 and s.shape == (29,) and s[-1] == 0 and s[0] == 1
    doc = [1.0000, 0.9837, 0.9667, 0.9490, 0.9305, 0.9113, 0.8912, 0.8701, 0.8481, 0.8250, 0.8008, 0.7753, 0.7486,
           0.7204, 0.6907, 0.6593, 0.6261, 0.5910, 0.5537, 0.5140, 0.4718, 0.4267, 0.3785, 0.3268, 0.2712, 0.2113,
           0.1466, 0.0764]  # dsd-reference.md section 2.4
    assert np.allclose(s[:-1].numpy(), doc, atol=6e-5)
    with pytest.raises(InputError):
        native.reference_sigmas(0, 2048)


def test_reference_sigmas_are_the_pipelines(tiny_pipe, reference_image):
    """Bit-exact against the sigmas dsd_core's pipeline (= the reference) steps through."""
    seen = {}

    def grab(pipe, step, t, tensors):
        seen["sigmas"] = pipe.scheduler.sigmas.clone()
        return {}

    tiny_pipe(reference_image, "a cat", height=64, width=128, num_inference_steps=3, seed=0, output_type="pt",
              callback_on_step_end=grab)
    tokens = (64 // 16) * (128 // 16)
    assert torch.equal(native.reference_sigmas(3, tokens), seen["sigmas"].float().cpu())


def test_compare_transformers(files, tmp_path, capsys):
    r = native.compare_transformers(files["dsd"], files["flux_bfl"])  # diffusers vs BFL layout
    assert r.equal_apart_from_c_embedder, r.summary()
    assert r.only_a == ["c_embedder.bias", "c_embedder.weight"] and r.compared > 20
    assert cli(["compare-transformers", files["dsd"], files["flux_bfl"], "--quiet"]) == 0
    assert "EQUAL apart from c_embedder" in capsys.readouterr().out
    # a changed value, a missing tensor
    sd = load_file(files["flux"])
    sd["transformer_blocks.0.attn.to_k.weight"][0, 0] += 0.5
    del sd["proj_out.bias"]
    changed = write(tmp_path / "changed.safetensors", sd)
    r = native.compare_transformers(files["dsd_bf16_bfl"], changed)
    assert not r.equal_apart_from_c_embedder
    names = [n for n, _ in r.differing]
    assert "transformer_blocks.0.attn.to_k.weight" in names  # also: bf16 rounding everywhere
    assert r.only_a == ["c_embedder.bias", "c_embedder.weight", "proj_out.bias"]
    assert cli(["compare-transformers", files["dsd"], changed, "--quiet"]) == 1
    assert "NOT equal" in capsys.readouterr().out
    save_file({"text_model.x.weight": torch.zeros(2)}, str(tmp_path / "clip.safetensors"))
    assert cli(["compare-transformers", files["dsd"], str(tmp_path / "clip.safetensors")]) == 2


def test_comfy_transformer_config_is_comfyui_loadable():
    """ComfyUI 0.33 derives num_heads = hidden // 128 and rope axes (16, 56, 56)."""
    c = COMFY_TRANSFORMER_CONFIG
    assert c["attention_head_dim"] == 128 == sum(c["axes_dims_rope"])
    assert tuple(c["axes_dims_rope"]) == (16, 56, 56)
    assert c["num_attention_heads"] * c["attention_head_dim"] == 128


# ------------------------------------------------------------------------------------------- nodes without ComfyUI
class FakeVAE:
    """ComfyUI's VAE interface: pixels [B, H, W, 3] in [0, 1] -> latent [B, 16, H/8, W/8]."""

    def __init__(self):
        self.seen = None

    def encode(self, pixels):
        self.seen = pixels
        return torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 8).repeat(1, 6, 1, 1)[:, :16]


def test_native_conditioning_node(reference_image):
    from dsd_core.image import pil_to_tensor
    from nodes.native import FLUX_SHIFT_FACTOR, DSDNativeConditioning

    pos = [[torch.ones(1, 5, 4), {"pooled_output": torch.ones(1, 3)}]]
    neg = [[torch.zeros(1, 5, 4), {"pooled_output": torch.zeros(1, 3)}]]
    vae = FakeVAE()
    image = pil_to_tensor(reference_image)
    p, ui, u, latent = DSDNativeConditioning().build(pos, neg, vae, image, 2.5, 256, 2, "center_crop")
    assert vae.seen.shape == (1, 256, 512, 3) and vae.seen[:, :, 256:].abs().max() == 0  # black right panel
    cond = p[0][1]["concat_latent_image"]
    assert cond.shape == (1, 16, 32, 64)
    assert ui[0][1]["concat_latent_image"] is cond and p[0][0] is pos[0][0] and ui[0][0] is neg[0][0]
    zero = u[0][1]["concat_latent_image"]
    assert torch.all(zero == FLUX_SHIFT_FACTOR)
    assert ((zero - 0.1159) * 0.3611).abs().max() == 0  # ComfyUI's Flux process_latent_in -> exactly 0
    assert all(c[0][1]["guidance"] == 2.5 for c in (p, ui, u))
    assert "concat_latent_image" not in pos[0][1]  # inputs untouched
    assert latent["samples"].shape == (2, 16, 32, 64) and latent["samples"].abs().max() == 0
    with pytest.raises(InputError, match="multiple of 16"):
        DSDNativeConditioning().build(pos, neg, vae, image, 2.5, 260, 1, "center_crop")


def test_scheduler_and_split_nodes():
    from nodes.native import DSDScheduler, DSDSplitCanvas

    (sigmas,) = DSDScheduler().get_sigmas(28, 512)
    assert torch.equal(sigmas, native.reference_sigmas(28, 2048))
    canvas = torch.rand(2, 8, 16, 3)
    right, left = DSDSplitCanvas().split(canvas)
    assert torch.equal(right, canvas[:, :, 8:]) and torch.equal(left, canvas[:, :, :8])


class FakeClip:
    def __init__(self, t5=True):
        self.tokenizer = type("Tok", (), {"t5xxl": object()})() if t5 else object()
        self.options, self.text = {}, None

    def clone(self):
        c = FakeClip()
        c.tokenizer, c.options = self.tokenizer, dict(self.options)
        self.clones = getattr(self, "clones", 0) + 1
        self.last_clone = c
        return c

    def set_tokenizer_option(self, k, v):
        self.options[k] = v

    def tokenize(self, text):
        self.text = text
        return {"t5xxl": [], "l": []}

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1), {"pooled_output": torch.zeros(1), "options": dict(self.options)}]]


def test_text_encode_node_cleans_and_pads_like_the_reference():
    from nodes.native import DSDTextEncode

    clip = FakeClip()
    cond, used = DSDTextEncode().encode(clip, "  this cat\nplaying\r\n ", "512")
    assert used == "this catplaying"
    assert clip.last_clone.text == used and cond[0][1]["options"] == {"t5xxl_min_length": 512}
    assert clip.options == {}  # the input CLIP is not modified
    cond, _ = DSDTextEncode().encode(clip, "x", "comfyui")
    assert cond[0][1]["options"] == {}
    with pytest.raises(InputError, match="DualCLIPLoader type flux"):
        DSDTextEncode().encode(FakeClip(t5=False), "x", "512")
