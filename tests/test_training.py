"""The training engine and the DSD method on the tiny model set, with a synthetic paired dataset made here.

The targets are a fixed, learnable transform of the references (colour inversion). Panels are 32 px, so a canvas is
8 tokens and a step takes a few tens of milliseconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ROOT
from processes import accelerate_launch, cli_env
from dsd_core import canvas as cv
from dsd_core.errors import InputError
from dsd_core.training import TrainConfig, Trainer, TrainingCancelled, get_method
from dsd_core.training.engine import BatchPlan, list_checkpoints, read_loss_csv
from dsd_core.training.methods.dsd_lora import DSDLoRAOptions

PANEL = 32
CAPTION = "a photo of the toy"


def transform(image: PIL.Image.Image) -> PIL.Image.Image:
    """The fixed transform the model learns: colour inversion."""
    return PIL.Image.fromarray(255 - np.asarray(image.convert("RGB")))


def smooth_image(rng) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)).resize((PANEL, PANEL),
                                                                                        PIL.Image.BILINEAR)


def write_pairs(folder, n: int, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as fh:
        for i in range(n):
            ref = smooth_image(rng)
            ref.save(os.path.join(folder, f"ref_{i}.png"))
            transform(ref).save(os.path.join(folder, f"tgt_{i}.png"))
            fh.write(json.dumps({"reference": f"ref_{i}.png", "target": f"tgt_{i}.png", "caption": CAPTION,
                                 "instruction": "invert the colours"}) + "\n")
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and a busy shared CPU makes OpenMP's
    spinning threads 20x slower. Restored for the other test modules (the parity goldens use two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("pairs"), 8)


def make_config(tiny_model, data, output, **kw) -> TrainConfig:
    args = dict(data=data, base=tiny_model["base"], from_flux=os.path.join(tiny_model["base"], "transformer"),
                output=str(output), panel_size=PANEL, min_image_size=PANEL, cpu=True, local_files_only=True,
                max_steps=6, batch_size=2, lr=1e-3, checkpoint_every=3, validate_every=0, gradient_checkpointing=False,
                cache_dir=os.path.join(str(output), "..", "cache"))
    args.update(kw)
    return TrainConfig(**args)


def make_method(config, **kw):
    return get_method("dsd-lora")(config, DSDLoRAOptions(**{"rank": 4, "alpha": 4.0, **kw}))


# ---------------------------------------------------------------------------------------------- the objective
def test_condition_latents_are_generations(tiny_model, pairs, tmp_path):
    """The cached condition posterior, sampled with seed S, equals DSDPipeline.prepare_condition with seed S."""
    from dsd_core.training.data import load_pairs

    method = make_method(make_config(tiny_model, pairs, tmp_path / "out"))
    method.load(torch.device("cpu"), torch.float32)
    record = load_pairs(pairs)[0]
    item = method.encode_item(record)
    _, ours = method.latents_from_posterior(item["condition_posterior"], torch.Generator().manual_seed(7))
    reference = method.pipe.image_processor.preprocess(record.open("reference"), height=PANEL, width=PANEL)
    theirs = method.pipe.prepare_condition(reference, seeds=[7])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert ours.shape == (1, cv.num_image_tokens(PANEL, 2 * PANEL), 64)
    # and the training canvas is [reference | target]: its left half encodes like the condition's left half
    x0, _ = method.latents_from_posterior(item["canvas_posterior"], None, "mode")
    cond, _ = method.latents_from_posterior(item["condition_posterior"], None, "mode")
    assert not torch.equal(x0[..., PANEL // 16:], cond[..., PANEL // 16:])  # right halves differ (target vs black)


def test_timestep_sampling_modes(tiny_model, pairs, tmp_path):
    method = make_method(make_config(tiny_model, pairs, tmp_path / "out"))
    method.load(torch.device("cpu"), torch.float32)
    for kind in ("flux_shift", "logit_normal", "sigmoid", "shift", "uniform"):
        method.options.timestep_sampling = kind
        s = method.sample_sigmas(4000, torch.Generator().manual_seed(0), 2048)
        assert s.min() > 0 and s.max() < 1, kind
    method.options.timestep_sampling = "flux_shift"
    shifted = method.sample_sigmas(4000, torch.Generator().manual_seed(0), 2048).mean()
    method.options.timestep_sampling = "logit_normal"
    plain = method.sample_sigmas(4000, torch.Generator().manual_seed(0), 2048).mean()
    assert shifted > plain + 0.1  # mu = 0.80 at 2048 tokens pushes towards noise, as sampling does


# ---------------------------------------------------------------------------------------------- learning + export
@pytest.fixture(scope="module")
def trained(tiny_model, pairs, tmp_path_factory):
    """One training run from FLUX, with the held-out distance to the transform measured before and after."""
    out = tmp_path_factory.mktemp("run") / "model"
    config = make_config(tiny_model, pairs, out, max_steps=30, batch_size=4, lr=1e-2, checkpoint_every=10,
                         validate_every=15, validation_pairs=1, validation_steps=2)
    method = make_method(config, rank=8, alpha=4.0, condition_dropout=0.0, caption_dropout=0.0)
    rng = np.random.default_rng(123)
    held_out = [smooth_image(rng) for _ in range(2)]
    distances = {}
    load = method.load

    def load_and_measure(device, dtype):
        load(device, dtype)
        distances["before"] = heldout_distance(method.pipe, held_out)

    method.load = load_and_measure
    progress = []
    result = Trainer(config, method, callback=progress.append, progress_bar=False).train()
    distances["after"] = heldout_distance(method.pipe, held_out)
    return dict(config=config, method=method, result=result, distances=distances, progress=progress,
                held_out=held_out, output=str(out))


def heldout_distance(pipe, images) -> float:
    """Mean squared distance between the generated right panel's latents and the transform's latents."""
    d = []
    for im in images:
        latents = pipe(im, CAPTION, height=PANEL, width=2 * PANEL, num_inference_steps=6, seed=0,
                       output_type="latent").images
        panels = [pipe.image_processor.preprocess(x, height=PANEL, width=PANEL) for x in (im, transform(im))]
        z = pipe.vae.encode(torch.cat(panels, dim=3)).latent_dist.mode()
        z = cv.pack_latents((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)
        rows, cols = PANEL // 16, 2 * PANEL // 16
        right = lambda t: t.view(1, rows, cols, -1)[:, :, cols // 2:]  # noqa: E731
        d.append(((right(latents) - right(z)) ** 2).mean().item())
    return float(np.mean(d))


def test_loss_falls_and_output_moves_toward_the_transform(trained):
    losses = [v for _, v in trained["result"].losses]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    d = trained["distances"]
    assert d["after"] < 0.9 * d["before"], d
    rows = read_loss_csv(os.path.join(trained["output"], "logs", "loss.csv"))
    assert rows == trained["result"].losses
    with open(os.path.join(trained["output"], "logs", "loss.csv"), encoding="utf-8") as fh:
        assert fh.readline() == "step,loss\n"


def test_progress_validation_and_checkpoints(trained):
    progress = trained["progress"]
    assert [p.step for p in progress] == list(range(1, 31))
    assert all(p.total_steps == 30 and p.seconds_per_step > 0 and p.tokens_per_second > 0 for p in progress)
    with_images = [p for p in progress if p.images]
    assert [p.step for p in with_images] == [15, 30]
    assert with_images[0].images[0].size == (3 * PANEL, PANEL)  # reference | target | generated
    assert os.path.isfile(os.path.join(trained["output"], "validation", "step-00000015_0.png"))
    names = [os.path.basename(p) for p in list_checkpoints(trained["output"])]
    assert names == ["step-00000010", "step-00000020", "step-00000030"]  # keep_checkpoints=3


def test_output_is_a_dsd_model_folder(trained, tiny_model, tmp_path):
    """generate --model OUTPUT loads the trained LoRA and c_embedder (linked, not copied) and reproduces the
    in-memory model; diffusers' load_lora_weights reads the LoRA with its alpha."""
    from safetensors import safe_open

    from dsd_core.loading import load_pipeline
    from dsd_core.transformer import LINK_FILE, read_transformer_link

    out = trained["output"]
    files = sorted(os.listdir(os.path.join(out, "transformer")))
    assert files == ["c_embedder.safetensors", "config.json", LINK_FILE]
    assert read_transformer_link(os.path.join(out, "transformer"))["base_transformer"] == \
        os.path.join(tiny_model["base"], "transformer")
    with safe_open(os.path.join(out, "pytorch_lora_weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("transformer.") for k in f.keys())
    assert meta["transformer.lora_alpha"] == 4.0 and meta["transformer.r"] == 8

    image = trained["held_out"][0]
    trained_pipe = trained["method"].pipe
    expected = trained_pipe(image, CAPTION, height=PANEL, width=2 * PANEL, num_inference_steps=3, seed=1,
                            output_type="pt").images
    loaded = load_pipeline(base=tiny_model["base"], model=out, dtype="float32", device="cpu", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    got = loaded(image, CAPTION, height=PANEL, width=2 * PANEL, num_inference_steps=3, seed=1, output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # diffusers' own loader: alpha from the metadata (alpha != rank, so a lost alpha would change the output)
    plain = load_pipeline(base=tiny_model["base"], model=out, lora=False, dtype="float32", device="cpu",
                          local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(out)
    got2 = plain(image, CAPTION, height=PANEL, width=2 * PANEL, num_inference_steps=3, seed=1, output_type="pt").images
    torch.testing.assert_close(got2, expected, rtol=1e-4, atol=1e-4)

    # a standalone copy carries the full transformer and loads without the base transformer folder
    from dsd_core.training.export import copy_model

    standalone = copy_model(out, str(tmp_path / "standalone"), standalone=True)
    assert LINK_FILE not in os.listdir(os.path.join(standalone, "transformer"))
    alone = load_pipeline(base=tiny_model["base"], model=standalone, dtype="float32", device="cpu",
                          local_files_only=True)
    alone.set_progress_bar_config(disable=True)
    got3 = alone(image, CAPTION, height=PANEL, width=2 * PANEL, num_inference_steps=3, seed=1, output_type="pt").images
    torch.testing.assert_close(got3, expected, rtol=1e-4, atol=1e-4)


def test_generate_cli_accepts_the_output(trained, tiny_model, tmp_path):
    from dsd_core.cli import main

    ref = tmp_path / "ref.png"
    trained["held_out"][0].save(ref)
    png = tmp_path / "gen.png"
    code = main(["generate", "--image", str(ref), "--prompt", CAPTION, "--out", str(png), "--base", tiny_model["base"],
                 "--model", trained["output"], "--height", str(PANEL), "--width", str(2 * PANEL), "--steps", "2",
                 "--seed", "0", "--offline", "--quiet"])
    assert code == 0 and PIL.Image.open(png).size == (PANEL, PANEL)


def test_linked_folder_errors_name_the_fix(trained, tmp_path):
    from dsd_core.errors import ModelNotFoundError
    from dsd_core.transformer import DSDTransformer2DModel, LINK_FILE

    broken = tmp_path / "transformer"
    shutil.copytree(os.path.join(trained["output"], "transformer"), broken)
    with open(broken / LINK_FILE, "w") as fh:
        json.dump({"base_transformer": str(tmp_path / "gone")}, fh)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        DSDTransformer2DModel.from_pretrained(str(broken))


# ---------------------------------------------------------------------------------------------- resume
def _state(method) -> dict:
    return {k: v.clone() for k, v in method.state_dict().items()}


def test_resume_continues_exactly(tiny_model, pairs, tmp_path):
    """Cancel at step 2, resume, Ctrl-C (SIGINT) at step 4, resume to step 6: the same losses and weights as one
    uninterrupted run, each stop having written its checkpoint."""
    full_cfg = make_config(tiny_model, pairs, tmp_path / "full", gradient_accumulation=2, checkpoint_every=0)
    full = make_method(full_cfg)
    full_result = Trainer(full_cfg, full, progress_bar=False).train()

    cut_cfg = make_config(tiny_model, pairs, tmp_path / "cut", gradient_accumulation=2, checkpoint_every=0)

    def cancel(progress):
        if progress.step == 2:
            raise TrainingCancelled("user pressed cancel")

    first = Trainer(cut_cfg, make_method(cut_cfg), callback=cancel, progress_bar=False).train()
    assert first.interrupted and first.step == 2
    assert os.path.basename(first.last_checkpoint) == "step-00000002"
    assert not os.path.exists(os.path.join(tmp_path / "cut", "transformer"))  # no export of a stopped run

    resume_cfg = make_config(tiny_model, pairs, tmp_path / "cut", gradient_accumulation=2, checkpoint_every=0,
                             resume="latest")

    def ctrl_c(progress):
        if progress.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the engine saves and stops after this step

    second = Trainer(resume_cfg, make_method(resume_cfg), callback=ctrl_c, progress_bar=False).train()
    assert second.interrupted and os.path.basename(second.last_checkpoint) == "step-00000004"
    resumed = make_method(resume_cfg)
    third = Trainer(resume_cfg, resumed, progress_bar=False).train()
    assert third.step == 6 and not third.interrupted
    np.testing.assert_allclose(np.array(third.losses), np.array(full_result.losses), rtol=1e-5, atol=1e-6)
    sa, sb = _state(full), _state(resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6)

    bad = make_config(tiny_model, pairs, tmp_path / "cut", gradient_accumulation=1, resume="latest", max_steps=8)
    with pytest.raises(InputError, match="gradient_accumulation"):
        Trainer(bad, make_method(bad), progress_bar=False).train()


def _cli_train(tiny_model, data, out, *extra):
    return [sys.executable, "-m", "dsd_core", "train", "--data", data, "--base", tiny_model["base"],
            "--from-flux", os.path.join(tiny_model["base"], "transformer"), "--output", str(out),
            "--panel-size", str(PANEL), "--min-image-size", str(PANEL), "--cpu", "--local-files-only",
            "--rank", "4", "--alpha", "4", "--batch-size", "2", "--lr", "1e-3", "--no-gradient-checkpointing",
            "--validate-every", "0", "--quiet", "--cache-dir", os.path.join(str(out), "..", "cache"), *extra]


def test_sigkill_then_resume(tiny_model, pairs, tmp_path):
    """A run killed with SIGKILL resumes from its last complete checkpoint and ends where an unkilled run ends."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_train(tiny_model, pairs, out, "--max-steps", "400", "--checkpoint-every", "2"),
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list_checkpoints(str(out)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert list_checkpoints(str(out)), "no checkpoint within 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = int(os.path.basename(list_checkpoints(str(out))[-1])[5:])
    assert killed_at < 400
    # resume in this process (the CLI path is the same Trainer; starting a second interpreter costs ~10 s)
    cfg = make_config(tiny_model, pairs, out, max_steps=killed_at + 2, checkpoint_every=2, resume="latest",
                      cache_dir=os.path.join(str(out), "..", "cache"))
    result = Trainer(cfg, make_method(cfg), progress_bar=False).train()
    assert result.step == killed_at + 2 and not result.interrupted
    resumed = read_loss_csv(os.path.join(out, "logs", "loss.csv"))
    assert [s for s, _ in resumed] == list(range(1, killed_at + 3))

    ref_cfg = make_config(tiny_model, pairs, tmp_path / "ref", max_steps=killed_at + 2, checkpoint_every=0)
    reference = Trainer(ref_cfg, make_method(ref_cfg), progress_bar=False).train()
    np.testing.assert_allclose(np.array(resumed), np.array(reference.losses), rtol=1e-5, atol=1e-6)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))


def test_two_processes_with_accelerate(tiny_model, pairs, tmp_path):
    """DDP over gloo with 2 CPU processes and gradient accumulation: trains, logs, exports once."""
    out = tmp_path / "ddp"
    cmd = [*accelerate_launch(2), "-m", "dsd_core", "train",
           *_cli_train(tiny_model, pairs, out, "--max-steps", "3", "--checkpoint-every", "2",
                       "--gradient-accumulation", "2", "--batch-size", "1")[4:]]
    res = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 processes" in res.stdout
    rows = read_loss_csv(os.path.join(out, "logs", "loss.csv"))
    assert [s for s, _ in rows] == [1, 2, 3]
    assert [os.listdir(c) for c in list_checkpoints(str(out))][-1].count("rng-1.safetensors") == 1
    assert os.path.isfile(os.path.join(out, "transformer", "c_embedder.safetensors"))


def test_runs_with_other_precision_in_one_process(tiny_model, pairs, tmp_path):
    """A second run in the same process (a ComfyUI session) may change accelerate's settings."""
    first = Trainer(make_config(tiny_model, pairs, tmp_path, mixed_precision="no"), None)._make_accelerator(torch.float32)
    assert first.mixed_precision == "no"
    second = Trainer(make_config(tiny_model, pairs, tmp_path, mixed_precision="bf16"),
                     None)._make_accelerator(torch.float32)
    assert second.mixed_precision == "bf16"
    Trainer(make_config(tiny_model, pairs, tmp_path), None)._make_accelerator(torch.float32)  # back to the default


def test_batch_plan_shards_are_disjoint_and_deterministic():
    plans = [BatchPlan(10, 2, 2, rank, seed=3) for rank in range(2)]
    for m in range(6):
        a, b = plans[0].indices(m), plans[1].indices(m)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    epoch0 = [i for m in range(2) for p in plans for i in p.indices(m)]
    assert sorted(epoch0) == sorted(set(epoch0))  # no item twice within an epoch
    assert BatchPlan(10, 2, 2, 0, seed=3).indices(5) == plans[0].indices(5)
    with pytest.raises(InputError, match="pairs but one step needs"):
        BatchPlan(3, 2, 2, 0, seed=0)


# ---------------------------------------------------------------------------------------------- data
def test_bad_items_are_reported_before_training(tiny_model, tmp_path):
    data = tmp_path / "bad"
    write_pairs(data, 3)
    (data / "broken.png").write_bytes(b"not a png")
    PIL.Image.new("RGB", (8, 8)).save(data / "small.png")
    lines = [
        {"reference": "ref_0.png", "target": "missing.png", "caption": "x"},
        {"reference": "broken.png", "target": "tgt_1.png", "caption": "y"},
        {"reference": "ref_2.png", "target": "tgt_2.png", "caption": ""},
        {"reference": "ref_1.png", "target": "tgt_1.png", "caption": CAPTION},  # duplicate of line 2
        {"reference": "small.png", "target": "tgt_0.png", "caption": "z"},
        {"target": "tgt_0.png", "caption": "no reference"},
    ]
    with open(data / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines))
        fh.write("{not json\n")
    config = make_config(tiny_model, str(data), tmp_path / "out", base=str(tmp_path / "no-base"))
    with pytest.raises(InputError) as e:
        Trainer(config, make_method(config), progress_bar=False).train()  # fails on the data, not the missing base
    msg = str(e.value)
    assert "line 9: missing 'reference'" in msg and "line 10: not valid JSON" in msg

    with open(data / "metadata.jsonl", encoding="utf-8") as fh:
        good = fh.readlines()[:3]
    with open(data / "metadata.jsonl", "w", encoding="utf-8") as fh:  # the 3 good pairs + the 5 bad ones
        fh.write("".join(good) + "".join(json.dumps(x) + "\n" for x in lines[:5]))
    with pytest.raises(InputError) as e:
        Trainer(config, make_method(config), progress_bar=False).train()
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert "line 4 (missing.png): target" in msg and "does not exist" in msg
    assert "line 5 (tgt_1.png): reference is not a readable image" in msg
    assert "line 6 (tgt_2.png): empty caption" in msg
    assert "line 7 (tgt_1.png): duplicate of metadata.jsonl line 2" in msg
    assert "line 8 (tgt_0.png): reference is 8x8, smaller than 32" in msg
    assert not os.path.exists(tmp_path / "out")


def test_hugging_face_parquet_with_column_mapping(tmp_path, pairs):
    import pyarrow as pa  # a dependency of the train and test extras
    import pyarrow.parquet as pq

    from dsd_core.training.data import load_pairs, validate_pairs

    rows = []
    for i in range(3):
        with open(os.path.join(pairs, f"ref_{i}.png"), "rb") as a, open(os.path.join(pairs, f"tgt_{i}.png"), "rb") as b:
            rows.append({"conditioning": {"bytes": a.read(), "path": None}, "image": {"bytes": b.read(), "path": None},
                         "text": f"caption {i}", "source": "laion"})
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000.parquet")
    # an Arrow file as `datasets` writes it, with image paths relative to the file
    arrow_rows = [{"conditioning": os.path.join(pairs, f"ref_{i}.png"), "image": os.path.join(pairs, f"tgt_{i}.png"),
                   "text": f"arrow {i}", "source": "local"} for i in range(3, 5)]
    table = pa.Table.from_pylist(arrow_rows)
    with pa.OSFile(str(tmp_path / "data" / "data-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    records = load_pairs(str(tmp_path / "data"), "conditioning", "image", "text")
    assert [r.caption for r in records] == ["arrow 3", "arrow 4", "caption 0", "caption 1", "caption 2"]
    assert records[3].extra == {"source": "laion"} and records[3].name == "train-00000.parquet row 1"
    assert type(records[3].reference).__name__ == "ArrowCell"  # image bytes stay on disk until used
    assert records[0].reference == os.path.join(pairs, "ref_3.png")
    validate_pairs(records, min_size=PANEL)
    assert records[3].open("target").size == (PANEL, PANEL)
    with open(os.path.join(pairs, "tgt_1.png"), "rb") as fh:
        assert records[3].open("target").tobytes() == PIL.Image.open(fh).convert("RGB").tobytes()
    with pytest.raises(InputError, match="no column 'reference'"):
        load_pairs(str(tmp_path / "data"))


def test_jsonl_extra_keys_are_kept(pairs):
    from dsd_core.training.data import load_pairs

    records = load_pairs(pairs)
    assert len(records) == 8 and records[0].extra == {"instruction": "invert the colours"}


def test_cache_is_reused_across_runs(tiny_model, pairs, tmp_path):
    from dsd_core.training.cache import TensorCache
    from dsd_core.training.data import load_pairs

    cfg = make_config(tiny_model, pairs, tmp_path / "out", cache_dir=str(tmp_path / "cache"))
    method = make_method(cfg)
    method.load(torch.device("cpu"), torch.float32)
    cache = TensorCache(cfg.cache_dir, method.cache_fingerprint())
    record = load_pairs(pairs)[0]
    first = cache.get_or_compute(record.content_key(), lambda: method.encode_item(record))
    again = TensorCache(cfg.cache_dir, method.cache_fingerprint())
    second = again.get_or_compute(record.content_key(), lambda: pytest.fail("recomputed a cached item"))
    assert again.hits == 1 and all(torch.equal(first[k], second[k]) for k in first)
    method.config = make_config(tiny_model, pairs, tmp_path / "out", panel_size=48, min_image_size=PANEL)
    assert method.cache_fingerprint() != again.folder.rsplit(os.sep, 1)[-1]


# ---------------------------------------------------------------------------------------------- config and files
def test_config_yaml_and_flags(tmp_path):
    from dsd_core.cli import build_parser
    from dsd_core.training.config import config_from_args

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: 50\nrank: 8\nlr: 2.0e-4\ncondition-dropout: 0.2\nmethod: dsd-lora\n")
    args = build_parser().parse_args(["train", "--config", str(yaml_file), "--rank", "16", "--resume",
                                      "--no-gradient-checkpointing"])
    config, options = config_from_args(args, TrainConfig, DSDLoRAOptions, ignore=("method",))
    assert (config.max_steps, config.lr, config.resume, config.gradient_checkpointing) == (50, 2e-4, "latest", False)
    assert (options.rank, options.condition_dropout, options.alpha) == (16, 0.2, 32.0)
    yaml_file.write_text("max_stepz: 50\n")
    with pytest.raises(InputError, match="max_stepz"):
        config_from_args(build_parser().parse_args(["train", "--config", str(yaml_file)]), TrainConfig,
                         DSDLoRAOptions)
    with pytest.raises(InputError, match="condition_dropout"):
        DSDLoRAOptions(condition_dropout=2)


def test_example_config_lists_every_option():
    import dataclasses

    import yaml

    from dsd_core.training.cli import example_config
    from dsd_core.training.config import build_config

    path = os.path.join(ROOT, "dsd_core", "training", "train_dsd.example.yaml")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text == example_config(), "regenerate: python -m dsd_core train --print-example-config > " + path
    values = yaml.safe_load(text)
    names = {f.name for cls in (TrainConfig, DSDLoRAOptions) for f in dataclasses.fields(cls)}
    assert names | {"method"} == set(values)
    assert values.pop("method") == "dsd-lora"
    config, options = build_config(values, TrainConfig, DSDLoRAOptions)
    assert (config.base_weights, config.from_flux, options.rank) == ("fp8", "FLUX.1-dev/transformer", 32)


def test_optimizer_choices_and_memory_estimate(tiny_model, pairs, tmp_path):
    import importlib.util

    from dsd_core.errors import DSDError
    from dsd_core.training.engine import build_optimizer
    from dsd_core.training.memory_estimate import estimate_dsd_training

    params = [torch.nn.Parameter(torch.zeros(2))]
    for name in ("adamw", "adafactor", "sgd"):
        assert build_optimizer(make_config(tiny_model, pairs, tmp_path, optimizer=name), params) is not None
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(DSDError, match="pip install bitsandbytes"):
            build_optimizer(make_config(tiny_model, pairs, tmp_path, optimizer="adamw8bit"), params)
    # full size, the documented defaults: fp8 base, rank 32, batch 1, 512x1024, AdamW, checkpointing
    cfg = TrainConfig(data="d", output="o", from_flux="f", base_weights="fp8")
    est = estimate_dsd_training(cfg, DSDLoRAOptions())
    assert 15 < est.peak_gib < 24 and 10 < est.frozen_gib < 22, est.summary()
    bigger = estimate_dsd_training(TrainConfig(data="d", output="o", from_flux="f", gradient_checkpointing=False),
                                   DSDLoRAOptions(rank=512))
    assert bigger.peak_gib > est.peak_gib + 10 and bigger.trainable_params == 16 * (est.trainable_params - 64 * 3072
                                                                                     - 3072) + 64 * 3072 + 3072


def test_state_tree_round_trip(tmp_path):
    from dsd_core.training.io import load_tree, save_tree

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    save_tree(opt.state_dict(), str(tmp_path / "opt.safetensors"))
    back = load_tree(str(tmp_path / "opt.safetensors"))
    assert back["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["state"][0][k], v)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(back)
