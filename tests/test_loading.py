"""Loading the DSD model set: the transformer class, folder layouts, and errors that say what to do."""

import json
import os
import shutil

import pytest
import torch

from conftest import FIXTURE
from dsd_core.errors import DSDError, ModelFormatError, ModelNotFoundError
from dsd_core.loading import load_pipeline, resolve_base, resolve_model
from dsd_core.memory import MemoryConfig
from dsd_core.transformer import DSDTransformer2DModel

DSD_DIR = os.path.join(FIXTURE, "dsd", "transformer")
FLUX_DIR = os.path.join(FIXTURE, "base", "transformer")


def _forward(model, seed=0, cond_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 64, generator=g)
    cond = torch.randn(1, 16, 64, generator=g) * cond_scale
    with torch.no_grad():
        return model(hidden_states=x, condition_hidden_states=cond, timestep=torch.tensor([0.5]),
                     guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=g),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=g), txt_ids=torch.zeros(8, 3),
                     img_ids=torch.zeros(16, 3), return_dict=False)[0]


def test_dsd_transformer_adds_condition_embedding():
    model = DSDTransformer2DModel.from_pretrained(DSD_DIR)
    assert model.c_embedder.in_features == 64 and model.c_embedder.out_features == 32
    assert model.c_embedder.weight.abs().sum() > 0
    # x_embedder(x) + c_embedder(cond): zeroing c_embedder must give the FLUX forward with the same weights
    a = _forward(model)
    with torch.no_grad():
        model.c_embedder.weight.zero_()
        model.c_embedder.bias.zero_()
    b = _forward(model)
    assert (a - b).abs().max() > 1e-4
    flux = __import__("diffusers").FluxTransformer2DModel.from_config(
        {k: v for k, v in model.config.items() if not k.startswith("_")})
    flux.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("c_embedder")})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, generator=g)
    torch.randn(1, 16, 64, generator=g)
    with torch.no_grad():
        c = flux(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                 pooled_projections=torch.randn(1, 32, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                 txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)[0]
    torch.testing.assert_close(b, c)


def test_condition_shape_errors():
    model = DSDTransformer2DModel.from_pretrained(DSD_DIR)
    with pytest.raises(ValueError, match="packed like the latents"):
        model(hidden_states=torch.zeros(1, 16, 64), condition_hidden_states=torch.zeros(1, 8, 64),
              timestep=torch.tensor([0.5]))


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_save_and_load_round_trip(tmp_path, shard):
    model = DSDTransformer2DModel.from_pretrained(DSD_DIR)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path / "t", **kw)
    files = sorted(os.listdir(tmp_path / "t"))
    assert "config.json" in files
    if shard:
        assert any(f.endswith(".index.json") for f in files) and sum(f.endswith(".safetensors") for f in files) > 1
    again = DSDTransformer2DModel.from_pretrained(tmp_path / "t")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_forward(again), _forward(model), rtol=0, atol=1e-5)


def test_plain_flux_is_refused_with_a_fix():
    with pytest.raises(ModelFormatError, match="plain FLUX transformer.*init_condition_embedder"):
        DSDTransformer2DModel.from_pretrained(FLUX_DIR)


def test_plain_flux_opt_in_zero_condition_layer():
    model = DSDTransformer2DModel.from_pretrained(FLUX_DIR, init_condition_embedder=True)
    assert model.c_embedder.weight.abs().sum() == 0 and model.c_embedder.bias.abs().sum() == 0
    assert not any(p.is_meta for p in model.parameters())


def test_missing_weights_and_config(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        DSDTransformer2DModel.from_pretrained(tmp_path / "empty")
    shutil.copy(os.path.join(DSD_DIR, "config.json"), tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        DSDTransformer2DModel.from_pretrained(tmp_path / "empty")


def test_truncated_checkpoint_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(DSD_DIR, "diffusion_pytorch_model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("proj_out")}
    os.makedirs(tmp_path / "t")
    shutil.copy(os.path.join(DSD_DIR, "config.json"), tmp_path / "t")
    save_file(sd, str(tmp_path / "t" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelFormatError, match="missing .* weights"):
        DSDTransformer2DModel.from_pretrained(tmp_path / "t")


def test_resolve_model_layouts_and_errors(tmp_path):
    dsd = os.path.join(FIXTURE, "dsd")
    t, lora = resolve_model(dsd)
    assert t.endswith("transformer") and lora.endswith("pytorch_lora_weights.safetensors")
    assert resolve_model(dsd, lora=False)[1] is None
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "m" / "transformer")
    with pytest.raises(ModelNotFoundError, match="has no pytorch_lora_weights.safetensors"):
        resolve_model(str(tmp_path / "m"))
    (tmp_path / "lora.bin").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="only safetensors"):
        resolve_model(dsd, lora=str(tmp_path / "lora.bin"))


def test_resolve_base_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_base(str(tmp_path / "nope"))
    shutil.copytree(os.path.join(FIXTURE, "base"), tmp_path / "base")
    shutil.rmtree(tmp_path / "base" / "tokenizer_2")
    with pytest.raises(ModelFormatError, match="missing tokenizer_2"):
        resolve_base(str(tmp_path / "base"))
    with pytest.raises(ModelFormatError, match="missing model_index.json"):
        resolve_base(os.path.join(FIXTURE, "dsd"))


def test_repo_ids_offline_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("primecai/dsd_model", local_files_only=True)
    msg = str(e.value)
    assert "\n" not in msg and "primecai/dsd_model" in msg and "point at a local folder" in msg
    with pytest.raises(ModelNotFoundError, match="FLUX.1-dev base"):
        resolve_base("black-forest-labs/FLUX.1-dev", local_files_only=True)


def test_repo_id_resolves_from_the_local_hub_cache(tmp_path, monkeypatch):
    """A repo id works offline once its files are in the Hugging Face cache (as after a download)."""
    cache = tmp_path / "hub" / "models--primecai--dsd_model"
    snap = cache / "snapshots" / ("0" * 40)
    shutil.copytree(os.path.join(FIXTURE, "dsd"), snap)
    os.makedirs(cache / "refs")
    (cache / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t, lora = resolve_model("primecai/dsd_model", local_files_only=True)
    assert os.path.samefile(t, snap / "transformer") and os.path.isfile(lora)


def test_load_pipeline_parts(fixture_pipe):
    assert isinstance(fixture_pipe.transformer, DSDTransformer2DModel)
    assert "dsd" in fixture_pipe.transformer.peft_config  # LoRA as an unfused PEFT adapter
    assert not any("lora" in n for n, _ in fixture_pipe.text_encoder.named_parameters())
    with pytest.raises(Exception, match="unknown offload .half.; use one of none, model, group, sequential"):
        load_pipeline(os.path.join(FIXTURE, "base"), os.path.join(FIXTURE, "dsd"), memory=MemoryConfig(offload="half"))
    with pytest.raises(DSDError, match=r"memory must be a dsd_core.memory.MemoryConfig.*from_preset\('12gb'\)"):
        load_pipeline(os.path.join(FIXTURE, "base"), os.path.join(FIXTURE, "dsd"), memory="12gb")
    with pytest.raises(Exception, match="unknown dtype"):
        load_pipeline(os.path.join(FIXTURE, "base"), os.path.join(FIXTURE, "dsd"), dtype="int8")


def test_official_config_loads(tmp_path):
    """The official transformer/config.json names the reference class; it loads all the same."""
    shutil.copytree(DSD_DIR, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["_class_name"] = "FluxTransformer2DConditionalModel"
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    model = DSDTransformer2DModel.from_pretrained(tmp_path / "t")
    assert model.c_embedder.weight.abs().sum() > 0


# ------------------------------------------------------------------ download errors say why, all at once
def test_everything_missing_is_reported_at_once_with_the_smallest_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as e:
        load_pipeline(local_files_only=True, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert ("cannot get the DSD weights from primecai/dsd_model and the FLUX.1-dev base components from "
            "black-forest-labs/FLUX.1-dev: it is not in the local Hugging Face cache and downloads are off") in msg
    assert "`hf download primecai/dsd_model --include 'transformer/*' --include pytorch_lora_weights.safetensors`" in msg
    assert ("`hf download black-forest-labs/FLUX.1-dev --include model_index.json --include 'scheduler/*' --include "
            "'text_encoder/*' --include 'text_encoder_2/*' --include 'tokenizer/*' --include 'tokenizer_2/*' "
            "--include 'vae/*'`") in msg
    # a GGUF transformer needs only the LoRA and the transformer config from the DSD repo (not 24 GB of weights)
    pytest.importorskip("gguf")
    gguf = tmp_path / "dsd-Q4_K.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError) as e:
        load_pipeline(local_files_only=True, device="cpu",
                      memory=MemoryConfig(transformer_weights="gguf", gguf_file=str(gguf)))
    assert ("`hf download primecai/dsd_model --include pytorch_lora_weights.safetensors --include "
            "transformer/config.json`") in str(e.value)


def _hub_failure(monkeypatch, error: Exception, offline: bool = False):
    import huggingface_hub
    import huggingface_hub.constants as c

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", offline)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("primecai/dsd_model")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_download_errors_say_why(monkeypatch):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def chained(outer, inner):
        try:
            raise inner
        except Exception as cause:
            try:
                raise outer from cause
            except Exception as e:
                return e

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    no_network = chained(LocalEntryNotFoundError("cannot find"), httpx2.ConnectError("no route to host"))
    assert "the Hub cannot be reached (no network?)" in _hub_failure(monkeypatch, no_network)
    assert "downloads are off (HF_HUB_OFFLINE=1)" in _hub_failure(monkeypatch, LocalEntryNotFoundError("x"), True)
    gated = _hub_failure(monkeypatch, GatedRepoError("gated", response=response))
    assert "is gated: accept its licence on huggingface.co/primecai/dsd_model" in gated and "hf download" in gated
    missing = _hub_failure(monkeypatch, RepositoryNotFoundError("nope", response=response))
    assert "was not found on the Hugging Face Hub" in missing and "hf download" not in missing
