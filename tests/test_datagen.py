"""Self-distillation data generation (dsd_core.datagen) on the tiny FLUX base and a local fake Gemini server.

The fake server's curation verdicts are scripted from the pixels of the two panels it is shown (so every run, fresh
or resumed, gets the same verdict for the same pair), and the tests recompute the expected verdict from the panel
files the run wrote.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from fake_gemini import FakeGemini, clean_env  # noqa: F401
from processes import accelerate_launch, cli_env
from test_prompt_enhance import tiny_vlm  # noqa: F401  (the tiny Idefics3 / SmolVLM fixture)

from dsd_core.datagen import DatagenConfig, Hooks, LAYOUTS, parse_verdict, run_datagen, split_grid
from dsd_core.training.config import read_yaml
from dsd_core.datagen.curation import Curator, decide
from dsd_core.datagen.grid_generation import batches, shard
from dsd_core.datagen.grid_prompts import make_grid_prompts, normalize, read_captions
from dsd_core.datagen.panel_split import ordered_pairs
from dsd_core.errors import InputError

CAPTIONS = ["a red ceramic teapot with a bamboo handle", "a plush toy dragon", "# a comment", "",
            "A red ceramic teapot with a bamboo handle.", "a blue robot with one round eye"]
TINY = dict(steps=2, panel_size=64, max_sequence_length=64, offline=True, dtype="float32", device="cpu")

# Scripted curation replies, chosen by the pixels of the two panels. Clients deliver replies as one line, so the
# labels arrive glued together ("SAMECONFIDENCE:"); the parser must cope.
SAME = ("SUBJECT: a teapot\nIMAGE 1: a red teapot with a bamboo handle\nIMAGE 2: the same red teapot, seen from the "
        "side\nREASONING: handle, colour and lid match\nVERDICT: SAME\nCONFIDENCE: 0.92")
DIFFERENT = "**Subject:** a robot\n**Verdict:** DIFFERENT\n**Confidence:** 80%"
LOW = "SUBJECT: a dragon IMAGE 1: green IMAGE 2: greenish REASONING: unsure VERDICT: SAME CONFIDENCE: 0.2"
GARBLED = "I cannot tell."
SCRIPT = (SAME, DIFFERENT, LOW, GARBLED)
EXPECTED_REASON = {SAME: None, DIFFERENT: "different_subject", LOW: "low_confidence", GARBLED: "malformed_reply"}
TARGET_CAPTION = "A shiny red teapot on a table, soft light"
INSTRUCTION = "put it in a snowy forest"


def _b64decode(data: str) -> bytes:
    data = data.translate(str.maketrans("+/", "-_"))
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _request_images(body) -> list[np.ndarray]:
    out = []
    for part in body["contents"][0]["parts"]:
        inline = part.get("inlineData") or part.get("inline_data")
        if inline:
            out.append(np.asarray(PIL.Image.open(io.BytesIO(_b64decode(inline["data"]))).convert("RGB")))
    return out


def _script_index(images: list[np.ndarray]) -> int:
    digest = hashlib.sha256(b"".join(a.tobytes() for a in images)).digest()
    return digest[0] % len(SCRIPT)


def _text(body) -> str:
    return " ".join(p.get("text", "") for p in body["contents"][0]["parts"])


def responder(body) -> str:
    images = _request_images(body)
    text = _text(body)
    if len(images) == 2 and "VERDICT" in text:
        reply = SCRIPT[_script_index(images)]
        if reply == GARBLED and "could not be read" in text and _script_index(images[::-1]) % 2 == 0:
            return SAME  # some garbled replies are fixed when asked again
        return reply
    if len(images) == 2:
        return INSTRUCTION
    if len(images) == 1:
        return TARGET_CAPTION
    return "NONE" if "robot" in text else '{"subject": "a glossy red teapot", "panels": ["in a garden", "on a desk"]}'


def expected_reason(out: str, row: dict, retried: bool = True) -> str | None:
    """The reason the script gives the pair of ``row`` (unordered: both orders share one request)."""
    a, b = sorted([row["reference"], row["target"]])
    images = [np.asarray(PIL.Image.open(os.path.join(out, p)).convert("RGB")) for p in (a, b)]
    reply = SCRIPT[_script_index(images)]
    if reply == GARBLED and retried and _script_index(images[::-1]) % 2 == 0:
        reply = SAME
    return EXPECTED_REASON[reply]


@pytest.fixture(scope="module")
def flux_pipe(tiny_model):
    from dsd_core.loading import load_flux_pipeline

    pipe = load_flux_pipeline(tiny_model["base"], dtype="float32", device="cpu", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def captions_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def gemini(monkeypatch, clean_env):  # noqa: F811
    with FakeGemini(responder=responder) as server:
        monkeypatch.setenv("GEMINI_API_KEY", "AIzaFAKE-datagen")
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", server.base_url)
        yield server


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------- pure parts

def test_parse_verdict_formats_and_malformed_replies():
    one_line = SAME.replace("\n", "")  # what the clients deliver
    v = parse_verdict(one_line)
    assert (v.same, v.confidence, v.subject) == (True, 0.92, "a teapot")
    assert v.image_2 == "the same red teapot, seen from the side" and v.reasoning.startswith("handle")
    v = parse_verdict(DIFFERENT.replace("\n", ""))
    assert (v.same, v.confidence) == (False, 0.8)
    assert parse_verdict('{"verdict": true, "confidence": 0.3}').same is True
    assert parse_verdict("VERDICT: NOT IDENTICAL").same is False
    for reply, problem in ((GARBLED, "no VERDICT"), ("", "empty"), (None, "empty"),
                           ("VERDICT: perhaps", "neither SAME nor DIFFERENT"),
                           ("VERDICT: SAME CONFIDENCE: very", "not a number"),
                           ("VERDICT: SAME CONFIDENCE: 250", "outside 0..1")):
        v = parse_verdict(reply)
        assert v.same is None and problem in v.problem, (reply, v)
    assert decide(parse_verdict(LOW), 0.5) == "low_confidence"
    assert decide(parse_verdict(LOW), 0.1) is None
    assert decide(parse_verdict(GARBLED), 0.5) == "malformed_reply"
    assert decide(parse_verdict(GARBLED), 0.5, on_malformed="keep") is None
    assert decide(parse_verdict("VERDICT: SAME"), 0.9) is None  # no confidence: the threshold does not apply


def test_malformed_reply_is_asked_again_then_rejected():
    class Client:
        def __init__(self, replies):
            self.replies, self.texts = list(replies), []

        def ask(self, text, images=(), step=""):
            assert len(images) == 2 and step == "curation"
            self.texts.append(text)
            return self.replies.pop(0)

    img = PIL.Image.new("RGB", (8, 8))
    fixed = Client([GARBLED, SAME])
    verdict, reason = Curator(fixed, malformed_retries=1).judge(img, img)
    assert reason is None and verdict.same and "could not be read (no VERDICT field)" in fixed.texts[1]
    stuck = Client([GARBLED, "VERDICT: ???"])
    verdict, reason = Curator(stuck, malformed_retries=1).judge(img, img)
    assert reason == "malformed_reply" and "neither SAME nor DIFFERENT" in verdict.problem
    custom = Client([SAME])
    Curator(custom, instructions="Only look at the handle.").judge(img, img)
    assert custom.texts[0].startswith("Only look at the handle.") and "VERDICT: SAME or DIFFERENT" in custom.texts[0]


def _grid(panels: list[np.ndarray], layout, gutter: int, border: int, gutter_color=255, border_color=0):
    p = panels[0].shape[0]
    w = layout.cols * p + (layout.cols - 1) * gutter + 2 * border
    h = layout.rows * p + (layout.rows - 1) * gutter + 2 * border
    img = np.full((h, w, 3), border_color, np.uint8)
    img[border:h - border, border:w - border] = gutter_color
    for k, panel in enumerate(panels):
        r, c = divmod(k, layout.cols)
        y, x = border + r * (p + gutter), border + c * (p + gutter)
        img[y:y + p, x:x + p] = panel
    return PIL.Image.fromarray(img)


@pytest.mark.parametrize("layout_name", ["1x2", "2x2"])
@pytest.mark.parametrize("gutter,border", [(0, 0), (6, 0), (8, 5), (3, 9)])
def test_split_recovers_panels_through_gutters_and_borders(layout_name, gutter, border):
    layout = LAYOUTS[layout_name]
    rng = np.random.default_rng(gutter * 10 + border)
    panels = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(layout.panels)]
    got = split_grid(_grid(panels, layout, gutter, border), layout, 96)
    assert len(got) == layout.panels
    for want, image in zip(panels, got):
        assert image.size == (96, 96)
        assert np.array_equal(np.asarray(image), want)
    assert ordered_pairs(layout.panels) == [(i, j) for i in range(layout.panels) for j in range(layout.panels)
                                            if i != j]


def test_split_trims_a_frame_around_each_panel():
    layout = LAYOUTS["1x2"]
    rng = np.random.default_rng(3)
    inner = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(2)]
    framed = [np.pad(p, ((4, 4), (4, 4), (0, 0)), constant_values=30) for p in inner]
    got = split_grid(_grid(framed, layout, gutter=0, border=0), layout, 80)
    for want, image in zip(inner, got):
        assert np.array_equal(np.asarray(image), want)


def test_grid_prompts_templates_dedup_and_cycle(captions_file):
    captions = read_captions(captions_file)
    assert captions == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[5]]  # comment, blank and near-duplicate dropped
    layout = LAYOUTS["2x2"]
    prompts = make_grid_prompts(captions, layout, num=7, seed=3)
    assert [p.index for p in prompts] == list(range(7)) and [p.seed for p in prompts] == list(range(3, 10))
    assert len({normalize(p.prompt) for p in prompts}) == 7
    assert [p.source_caption for p in prompts[:4]] == captions + captions[:1]
    first = prompts[0]
    assert "identical red ceramic teapot" in first.prompt and "same subject" in first.prompt
    assert len(first.panels) == 4 and all(f": the red ceramic teapot with a bamboo handle {s}." in first.prompt
                                          for s in first.panels)
    assert make_grid_prompts(captions, layout, num=7, seed=3) == prompts  # deterministic
    assert make_grid_prompts(captions, layout, num=7, seed=4) != prompts
    with pytest.raises(InputError, match="does not exist"):
        read_captions(captions_file + ".missing")


def test_grid_prompts_from_gemini(gemini, captions_file):
    from dsd_core.prompt import GeminiEnhancer

    writer = GeminiEnhancer(timeout=5, retries=0)
    prompts = make_grid_prompts(read_captions(captions_file), LAYOUTS["1x2"], writer=writer, writer_name="gemini")
    # the robot caption gets NONE (no clear subject) and is dropped; the two others share the scripted reply, so the
    # second is a duplicate prompt and is dropped too -- then a variation round asks again and dedups once more
    assert [p.source for p in prompts] == ["gemini"]
    assert prompts[0].subject == "a glossy red teapot" and prompts[0].panels == ("in a garden", "on a desk")
    assert "Left panel: the glossy red teapot in a garden." in prompts[0].prompt
    assert all("image caption" in _text(r["body"]) for r in gemini.requests)


def test_shards_cover_every_batch_once():
    for count in (1, 5, 8, 13):
        for size in (1, 2, 3):
            groups = batches(count, size)
            assert [i for g in groups for i in g] == list(range(count))
            for world in (1, 2, 3, 5):
                owned = [i for rank in range(world) for g in shard(groups, rank, world) for i in g]
                assert sorted(owned) == list(range(count))  # no overlap, no gap
    with pytest.raises(ValueError):
        shard(batches(4, 1), 2, 2)


def test_config_from_yaml_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("layout: 2x2\nmin-confidence: 0.7\nsteps: 4\n", encoding="utf-8")
    cfg = DatagenConfig.from_sources(str(cfg_file), steps=2, seed=None)
    assert (cfg.layout, cfg.min_confidence, cfg.steps, cfg.seed) == ("2x2", 0.7, 2, 0)
    cfg_file.write_text("stepz: 4\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown datagen setting.*stepz"):
        DatagenConfig.from_sources(str(cfg_file))
    with pytest.raises(InputError, match="curator='gpt' is not one of"):
        DatagenConfig(curator="gpt")
    with pytest.raises(InputError, match="multiple of 16"):
        DatagenConfig(panel_size=100)
    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dsd_core", "datagen", "example_config.yaml")
    assert DatagenConfig.from_sources(example).fingerprint()  # the shipped example is valid
    assert set(read_yaml(example)) <= set(DatagenConfig.__dataclass_fields__)


# ------------------------------------------------------------------------------------------------- whole chain

def test_whole_chain_with_gemini_curation_through_the_cli(gemini, captions_file, tiny_model, tmp_path, capsys):
    """captions -> grid prompts -> FLUX grids -> panels -> scripted Gemini verdicts -> captions -> dataset."""
    from dsd_core.cli import main

    out = tmp_path / "out"
    cfg = tmp_path / "datagen.yaml"
    cfg.write_text("steps: 2\npanel_size: 64\nmax_sequence_length: 64\ndtype: float32\ndevice: cpu\n"
                   "instruction_captions: true\n"
                   "min_confidence: 0.5\ntimeout: 10\nretries: 0\n", encoding="utf-8")
    code = main(["datagen", "--captions", captions_file, "--base", tiny_model["base"], "--out", str(out),
                 "--layout", "2x2", "--curator", "gemini", "--num", "3", "--seed", "5", "--config", str(cfg),
                 "--offline", "--batch-size", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    rows, audit = read_jsonl(out / "metadata.jsonl"), read_jsonl(out / "audit.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grids_done"] == 3 and summary["panels"] == 12 and summary["candidate_pairs"] == 36
    assert summary["kept"] == len(rows) and summary["rejected"] == len(audit) and len(rows) + len(audit) == 36
    assert f"{summary['kept']} kept" in printed
    for row in rows:  # the trainer's format: relative paths to existing images, a caption; extra keys kept
        for key in ("reference", "target"):
            assert not os.path.isabs(row[key]) and PIL.Image.open(out / row[key]).size == (64, 64)
        assert row["caption"] == TARGET_CAPTION and row["caption_source"] == "gemini"
        assert row["instruction"] == INSTRUCTION and row["source_caption"] in CAPTIONS
        assert expected_reason(str(out), row) is None
    reasons = {}
    for row in audit:
        assert row["reason"] == expected_reason(str(out), row)
        assert row["verdict"]["reply"] or row["verdict"]["problem"]
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    assert reasons == {k: v for k, v in summary["rejected_by_reason"].items() if v}
    assert len(reasons) >= 2 and rows, "the script should give kept pairs and several rejection reasons"
    assert PIL.Image.open(out / "contact_sheet.png").size[0] > 0
    prompts = read_jsonl(out / "prompts.jsonl")
    assert [p["seed"] for p in prompts] == [5, 6, 7] and all(p["source"] == "template" for p in prompts)


def test_kill_and_resume_gives_the_same_dataset(gemini, captions_file, flux_pipe, tmp_path):
    calls = []

    class CountingPipe:
        def __call__(self, **kw):
            calls.append(len(kw["prompt"]))
            return flux_pipe(**kw)

    def config(out):
        return DatagenConfig(captions=captions_file, out=str(out), layout="1x2", curator="gemini", num=4,
                             batch_size=2, timeout=10, retries=0, **TINY)

    full = tmp_path / "full"
    run_datagen(config(full), pipe=flux_pipe)

    class Killed(Exception):
        pass

    def kill(stage, item_id):
        if (stage, item_id) == ("curated", "000001"):
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        run_datagen(config(part), pipe=CountingPipe(), hooks=Hooks(after_stage=kill))
    assert calls == [2, 2]  # every grid was drawn before the kill
    assert not (part / "metadata.jsonl").exists()
    before = len(gemini.requests)
    calls.clear()
    summary = run_datagen(config(part), pipe=CountingPipe())
    assert calls == []  # nothing redrawn
    assert summary["grids_done"] == 4
    # only the unfinished grids were asked about again: 000001's captions, 000002 and 000003
    assert 0 < len(gemini.requests) - before < before
    for name in ("metadata.jsonl", "audit.jsonl", "summary.json", "contact_sheet.png", "prompts.jsonl"):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name
    for sub in ("grids", "panels"):
        assert sorted(os.listdir(full / sub)) == sorted(os.listdir(part / sub))
        for name in os.listdir(full / sub):
            assert (full / sub / name).read_bytes() == (part / sub / name).read_bytes()
    assert not [n for n in os.listdir(part / "manifest") if n.startswith(".tmp")]

    # a kill in the middle of a batch: the batch is drawn again, only its missing grid is saved
    os.remove(part / "grids" / "000003.png")
    os.remove(part / "manifest" / "000003.json")
    run_datagen(config(part), pipe=CountingPipe())
    assert calls == [2]
    assert (full / "grids" / "000003.png").read_bytes() == (part / "grids" / "000003.png").read_bytes()
    assert (full / "metadata.jsonl").read_bytes() == (part / "metadata.jsonl").read_bytes()

    with pytest.raises(InputError, match="other settings.*min_confidence"):
        run_datagen(DatagenConfig(**{**config(part).to_dict(), "min_confidence": 0.9}), pipe=flux_pipe)


def test_curator_errors_leave_the_grid_pending(monkeypatch, clean_env, captions_file, flux_pipe,  # noqa: F811
                                               tmp_path):
    cfg = DatagenConfig(captions=captions_file, out=str(tmp_path / "out"), curator="gemini", num=1, timeout=5,
                        retries=0, **TINY)
    with pytest.raises(InputError, match="no Gemini API key"):
        run_datagen(cfg, pipe=flux_pipe)
    with FakeGemini("500") as server:
        monkeypatch.setenv("GEMINI_API_KEY", "AIzaFAKE-datagen")
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", server.base_url)
        summary = run_datagen(cfg, pipe=flux_pipe)
    assert summary["grids_pending"] == 1 and summary["kept"] == 0
    assert json.loads((tmp_path / "out" / "manifest" / "000000.json").read_text())["stage"] == "panels"
    with FakeGemini(responder=lambda body: SAME) as server:
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", server.base_url)
        summary = run_datagen(cfg, pipe=flux_pipe)
    assert summary["grids_pending"] == 0 and summary["kept"] == 2


def test_local_vlm_curator_runs_the_real_model(tiny_vlm):
    from dsd_core.prompt import LocalVLMEnhancer, unload_local_models

    client = LocalVLMEnhancer(str(tiny_vlm[0]), max_new_tokens=6, keep_loaded=True)
    rng = np.random.default_rng(0)
    a, b = (PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    try:
        verdict, reason = Curator(client, malformed_retries=1).judge(a, b)
        prompts = make_grid_prompts(["a plush toy dragon"], LAYOUTS["1x2"], writer=client, writer_name="local")
    finally:
        unload_local_models()
    # a random model writes letters, never the answer format: a malformed verdict with the raw reply kept
    assert reason == "malformed_reply" and verdict.same is None and verdict.reply
    # ... and no JSON for the grid prompt (text only, the local LLM path): the template steps in, and says so
    assert len(prompts) == 1 and prompts[0].source.startswith("template (fallback: no JSON object")
    with pytest.raises(InputError, match="local VLM folder .* does not exist"):
        run_datagen(DatagenConfig(captions="c.txt", out="o", curator="local", local_vlm="/nonexistent/vlm"))


def test_two_processes_cover_every_grid_once(captions_file, tiny_model, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each grid is drawn by exactly one process, and the dataset equals
    a single-process run's."""
    out = tmp_path / "two"
    env = cli_env()
    args = ["-m", "dsd_core", "datagen", "--captions", captions_file, "--base", tiny_model["base"], "--curator", "none",
            "--num", "3", "--batch-size", "1", "--steps", "2", "--panel-size", "64", "--max-sequence-length", "64",
            "--dtype", "float32", "--offline", "--quiet"]
    result = subprocess.run(accelerate_launch(2) + args + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [read_jsonl(out / "processes" / f"{rank}.jsonl") for rank in (0, 1)]
    drawn = [entry["drawn"] for log in logs for entry in log]
    assert [log[0]["num_processes"] for log in logs] == [2, 2]
    assert sorted(i for d in drawn for i in d) == [f"{k:06d}" for k in range(3)]  # every grid exactly once
    assert all(d for d in drawn), "both processes drew grids"
    # the same command in one process, in the same environment
    single = tmp_path / "one"
    result = subprocess.run([sys.executable] + args + ["--out", str(single)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (single / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()
    assert sorted(os.listdir(single / "grids")) == sorted(os.listdir(out / "grids"))
    for name in os.listdir(single / "grids"):
        assert (single / "grids" / name).read_bytes() == (out / "grids" / name).read_bytes()


def test_generated_dataset_trains_a_few_steps(captions_file, flux_pipe, tiny_model, tmp_path):
    """The chain's end: the trainer validates the generated folder and trains the DSD LoRA on it for a few steps."""
    from dsd_core.training import TrainConfig, Trainer, get_method
    from dsd_core.training.data import load_pairs, validate_pairs
    from dsd_core.training.methods.dsd_lora import DSDLoRAOptions

    data = tmp_path / "pairs"
    summary = run_datagen(DatagenConfig(captions=captions_file, out=str(data), curator="none", num=2, batch_size=2,
                                        instruction_captions=True, **{**TINY, "panel_size": 32}), pipe=flux_pipe)
    assert summary["kept"] == 4
    records = load_pairs(str(data))
    validate_pairs(records, min_size=32)
    assert [r.extra["instruction"].startswith("show it ") for r in records] == [True] * 4  # extra keys are kept
    config = TrainConfig(data=str(data), base=tiny_model["base"], from_flux=os.path.join(tiny_model["base"],
                                                                                           "transformer"),
                         output=str(tmp_path / "model"), panel_size=32, min_image_size=32, cpu=True,
                         local_files_only=True, max_steps=2, batch_size=2, lr=1e-3, checkpoint_every=0,
                         validate_every=0, gradient_checkpointing=False, cache_dir=str(tmp_path / "cache"))
    result = Trainer(config, get_method("dsd-lora")(config, DSDLoRAOptions(rank=4, alpha=4.0)),
                     progress_bar=False, handle_sigint=False).train()
    assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(loss) for _, loss in result.losses)
    assert os.path.isfile(tmp_path / "model" / "pytorch_lora_weights.safetensors")
