"""Proves the engine harness with the probe pack (probe_pack.py): a real ComfyUI run through
POST /prompt -> /history -> /view, a failing node, and /interrupt."""

from __future__ import annotations

import io
import time
import uuid

import pytest

from .client import (
    NET_GUARD_MARK,
    PromptError,
    WsListener,
    assert_success,
    execution_error,
    status_messages,
    succeeded,
    was_interrupted,
)


def _prefix(tag: str) -> str:
    return f"dsd_probe_{tag}_{uuid.uuid4().hex[:8]}"


def add_and_save(a: int, b: int, size: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "DSDProbeAddIntsToImage", "inputs": {"a": a, "b": b, "size": size}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": prefix}},
    }


def test_probe_nodes_registered(comfy):
    info = comfy.object_info("DSDProbeAddIntsToImage")
    assert set(info) == {"DSDProbeAddIntsToImage"}
    node = info["DSDProbeAddIntsToImage"]
    assert node["output"] == ["INT", "IMAGE"]
    assert node["input"]["required"]["a"][0] == "INT"
    assert node["category"] == "dsd_engine_probe"
    everything = comfy.object_info()
    assert {"DSDProbeRaise", "DSDProbeSlow", "SaveImage", "KSampler"} <= set(everything)


def test_prompt_to_saved_image(comfy, comfy_engine):
    from PIL import Image

    prefix = _prefix("ok")
    entry = assert_success(comfy.run(add_and_save(40, 2, 4, prefix), timeout=60))
    images = comfy.output_images(entry, "2")
    assert len(images) == 1, entry["outputs"]
    img_ref = images[0]
    assert img_ref["type"] == "output" and img_ref["filename"].startswith(prefix)
    png = comfy.get_image(img_ref["filename"], img_ref["subfolder"], img_ref["type"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(png)).convert("RGB")
    assert im.size == (4, 4)
    assert {im.getpixel((x, y)) for x in range(4) for y in range(4)} == {(42, 42, 42)}
    # the file really is in the --output-directory of this test server
    assert (comfy_engine.output_dir / img_ref["subfolder"] / img_ref["filename"]).is_file()


def test_validation_error_is_http_400(comfy):
    bad = add_and_save(5000, 2, 4, _prefix("bad"))  # a > max
    with pytest.raises(PromptError) as ei:
        comfy.queue_prompt(bad)
    assert ei.value.status == 400
    assert ei.value.error.get("type") == "prompt_outputs_failed_validation"
    errs = ei.value.node_errors["1"]["errors"]
    assert any(e["type"] == "value_bigger_than_max" for e in errs), errs


def test_unknown_node_type_is_rejected(comfy):
    with pytest.raises(PromptError) as ei:
        comfy.queue_prompt({"1": {"class_type": "DSDNoSuchNode", "inputs": {}}})
    assert ei.value.status in (400, 500)  # 2024 engine: 500 (KeyError); current: 400 missing_node_type


def test_raising_node_reports_execution_error_and_server_recovers(comfy):
    msg = f"probe failure {uuid.uuid4().hex[:6]}"
    entry = comfy.run({"1": {"class_type": "DSDProbeRaise", "inputs": {"message": msg}}}, timeout=60)
    assert not succeeded(entry)
    assert entry["status"]["status_str"] == "error"
    err = execution_error(entry)
    assert err is not None, status_messages(entry)
    assert err["node_id"] == "1" and err["node_type"] == "DSDProbeRaise"
    assert err["exception_type"].endswith("RuntimeError")
    assert err["exception_message"].strip() == msg
    assert any("raise RuntimeError(message)" in line for line in err["traceback"])
    # the server still serves the next prompt
    entry2 = assert_success(comfy.run(add_and_save(1, 2, 2, _prefix("after_err")), timeout=60))
    assert len(comfy.output_images(entry2, "2")) == 1


def test_interrupt_ends_slow_node_promptly(comfy):
    steps, step_s = 1200, 0.05  # would take 60 s
    prompt = {"1": {"class_type": "DSDProbeSlow",
                    "inputs": {"steps": steps, "step_seconds": step_s, "tag": uuid.uuid4().hex}}}
    with WsListener(comfy.base_url, comfy.client_id) as ws:
        pid = comfy.queue_prompt(prompt)
        comfy.wait_until_running(pid, timeout=30)
        deadline = time.monotonic() + 20
        while not [p for p in ws.events("progress") if p.get("prompt_id") in (pid, None)] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = ws.events("progress")
        assert progress, f"no ws progress from ProgressBar; got {[m.get('type') for m in ws.messages]}"
        assert progress[-1]["max"] == steps and 0 < progress[-1]["value"] < steps
        assert str(progress[-1].get("node")) == "1"

        t0 = time.monotonic()
        assert comfy.interrupt() == 200
        entry = comfy.wait_for(pid, timeout=15)
        elapsed = time.monotonic() - t0
    assert elapsed < 5, f"interrupt took {elapsed:.1f}s"
    assert entry["status"]["status_str"] == "error"
    assert was_interrupted(entry), status_messages(entry)
    assert execution_error(entry) is None
    assert "1" not in entry.get("outputs", {})
    assert any(m.get("type") == "execution_interrupted" for m in ws.messages)
    # and the next run is not affected by the interrupt flag
    entry2 = comfy.run({"1": {"class_type": "DSDProbeSlow",
                              "inputs": {"steps": 3, "step_seconds": 0.0, "tag": uuid.uuid4().hex}}}, timeout=30)
    assert_success(entry2)
    assert entry2["outputs"]["1"]["steps_done"] == [3]


def test_no_network_access_attempted(comfy_engine):
    blocked = [line for line in comfy_engine.log_text().splitlines() if NET_GUARD_MARK in line]
    assert not blocked, "the server tried to reach the network:\n" + "\n".join(blocked[:20])


def test_models_dir_is_registered_and_rescanned(comfy, engine_models_dir):
    """Files written into engine_models_dir after the server started are listed by the core
    loaders (2024 names unet/clip resolve to diffusion_models/text_encoders)."""
    name = f"dsd_probe_{uuid.uuid4().hex[:8]}.safetensors"
    files = [engine_models_dir / sub / name for sub in ("loras", "diffusion_models", "text_encoders")]
    for f in files:
        f.write_bytes(b"")  # never loaded: only listed
    try:
        def options(node: str, inp: str) -> list:
            return comfy.object_info(node)[node]["input"]["required"][inp][0]

        assert name in options("LoraLoader", "lora_name")
        assert name in options("UNETLoader", "unet_name")
        assert name in options("CLIPLoader", "clip_name")
    finally:
        for f in files:
            f.unlink()
