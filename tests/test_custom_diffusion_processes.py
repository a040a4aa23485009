"""Custom Diffusion's generated class images under ``accelerate launch`` (2 CPU processes over gloo): the processes
share the images (process r draws the indices k with k % 2 == r), the folder is byte-identical to a single process's,
and a rerun takes the images from the cache, drawing only a deleted one again."""

from __future__ import annotations

import os
import re
import subprocess
import sys

COUNT = 5


def _args(tiny_model, instance_dir, output, cache) -> list[str]:
    return ["custom-diffusion", "train", "--mode", "flux", "--base", tiny_model["base"], "--output", str(output),
            "--instance-dir", str(instance_dir), "--instance-prompt", "photo of a <new1> cat",
            "--num-class-images", str(COUNT), "--class-steps", "1", "--class-cache", str(cache), "--cpu",
            "--max-steps", "1", "--checkpoint-every", "0", "--min-image-size", "16", "--panel-size", "32",
            "--rank", "2", "--max-sequence-length", "32", "--local-files-only", "--no-gradient-checkpointing"]


def _drawn(text: str) -> dict:
    """``{process index: [drawn indices]}`` from the ``class images ...: drew ...`` lines."""
    out = {}
    for m in re.finditer(r"class images [^;]*; drew (none|\[[0-9, ]*\])(?: \(process (\d) of (\d)\))?", text):
        out[int(m.group(2) or 0)] = [] if m.group(1) == "none" else [int(x) for x in re.findall(r"\d+", m.group(1))]
    return out


def _images(cache) -> dict:
    (folder,) = [os.path.join(cache, d) for d in os.listdir(cache)]  # one prompt + settings -> one folder
    return {n: os.path.join(folder, n) for n in sorted(os.listdir(folder))}


def test_two_processes_share_class_images_identical_to_one_and_resume(tiny_model, tmp_path, capsys):
    from dsd_core.cli import main
    from dsd_core.tiny import reference_image

    cat = tmp_path / "cat"
    cat.mkdir()
    for i in range(2):
        reference_image(48, 48, seed=i).save(cat / f"{i}.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    two = tmp_path / "cache_two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dsd_core",
           *_args(tiny_model, cat, tmp_path / "run_two", two)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 processes" in result.stdout
    assert _drawn(result.stdout) == {0: [0, 2, 4], 1: [1, 3]}, result.stdout  # each image drawn once, shared

    one = tmp_path / "cache_one"
    assert main(_args(tiny_model, cat, tmp_path / "run_one", one)) == 0
    assert _drawn(capsys.readouterr().out) == {0: list(range(COUNT))}
    got, want = _images(two), _images(one)
    assert list(got) == [f"class_{k:04d}.png" for k in range(COUNT)] == list(want)
    assert os.path.basename(os.path.dirname(got["class_0000.png"])) == \
        os.path.basename(os.path.dirname(want["class_0000.png"]))  # the same cache key
    for name in want:
        with open(got[name], "rb") as a, open(want[name], "rb") as b:
            assert a.read() == b.read(), f"{name}: two processes drew other bytes than one process"

    # resumable: a rerun on the two processes' cache draws only the deleted image (the others are not rewritten)
    before = {n: os.stat(p) for n, p in got.items()}
    with open(got["class_0003.png"], "rb") as fh:
        deleted = fh.read()
    os.remove(got["class_0003.png"])
    assert main(_args(tiny_model, cat, tmp_path / "run_again", two)) == 0
    assert _drawn(capsys.readouterr().out) == {0: [3]}
    with open(got["class_0003.png"], "rb") as fh:
        assert fh.read() == deleted
    for name, st in before.items():
        if name != "class_0003.png":
            now = os.stat(got[name])
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"
