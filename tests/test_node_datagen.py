"""The data-generation nodes run in-process on the tiny FLUX base: every stage's output can be inspected, the curation
node reports each verdict, and the whole-chain node writes a dataset folder."""

from __future__ import annotations

import json
import os

import pytest

from fake_gemini import FakeGemini, clean_env  # noqa: F401

from nodes import _comfy
from nodes.datagen import DSDCuratePairs, DSDDataGen, DSDFluxLoader, DSDGridGenerate, DSDGridPrompts, DSDPanelSplit

CAPTIONS = "a red ceramic teapot\n# skipped\na plush toy dragon\na red ceramic teapot"


@pytest.fixture(scope="module")
def flux(tiny_model):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_comfy, "folder_roots", lambda name: [os.path.dirname(tiny_model["base"])])
        return DSDFluxLoader().load("base", "float32", "full")[0]


def test_stage_nodes_show_grids_panels_and_verdicts(flux, monkeypatch, clean_env):  # noqa: F811
    out = DSDGridPrompts().make(CAPTIONS, "1x2", 0, 7, "template", "", "")
    prompts, text = out["result"]
    assert [p.source_caption for p in prompts] == ["a red ceramic teapot", "a plush toy dragon"]
    assert [p.seed for p in prompts] == [7, 8] and "[000001] seed 8" in text and out["ui"]["text"] == [text]

    grids = DSDGridGenerate().generate(flux, prompts, 2, 3.5, 64, 2)[0]
    assert tuple(grids.shape) == (2, 64, 128, 3)
    panels = DSDPanelSplit().split(grids, "1x2", 64, True)[0]
    assert tuple(panels.shape) == (4, 64, 64, 3)

    replies = iter(["SUBJECT: teapot VERDICT: SAME CONFIDENCE: 0.9", "VERDICT: DIFFERENT CONFIDENCE: 0.7"])
    with FakeGemini(responder=lambda body: next(replies)) as server:
        monkeypatch.setenv("GEMINI_API_KEY", "AIzaFAKE-node")
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", server.base_url)
        result = DSDCuratePairs().curate(panels, "1x2", "gemini", 0.5, "reject", "", "")
        assert server.request_count == 2  # one request per unordered pair
    kept, rejected, verdicts = result["result"]
    assert tuple(kept.shape) == (2, 64, 128, 3) and tuple(rejected.shape) == (2, 64, 128, 3)
    rows = json.loads(verdicts)
    assert [(r["grid"], r["kept"], r["reason"]) for r in rows] == [
        (0, True, None), (0, True, None), (1, False, "different_subject"), (1, False, "different_subject")]
    assert rows[0]["subject"] == "teapot" and rows[0]["confidence"] == 0.9

    none = DSDCuratePairs().curate(panels[:2], "1x2", "none", 0.5, "reject", "", "")["result"]
    assert none[0].shape[0] == 2 and none[1].shape[0] == 1  # the rejected output is a placeholder
    with pytest.raises(Exception, match="not a whole number"):
        DSDCuratePairs().curate(panels[:3], "1x2", "none", 0.5, "reject", "", "")


def test_whole_chain_node_writes_a_resumable_dataset(flux, tmp_path):
    node = DSDDataGen()
    args = (flux, CAPTIONS, str(tmp_path / "ds"), "1x2", 3, 0, "template", "none", 2, 3.5, 32, 1, 0.5, False)
    summary, sheet, folder = node.run(*args)["result"]
    assert "3 done of 3" in summary and "6 kept" in summary and sheet.shape[-1] == 3
    lines = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8")]
    assert len(lines) == 6 and all(os.path.isfile(os.path.join(folder, line["target"])) for line in lines)
    assert node.run(*args)["result"][0] == summary  # queued again: nothing left to do, same dataset
    with pytest.raises(Exception, match="other settings"):
        node.run(*args[:-2], 0.9, False)
