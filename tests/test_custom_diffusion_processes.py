"""Custom Diffusion's generated class images under ``accelerate launch`` (2 CPU processes over gloo): the processes
share the images (process r draws the indices k with k % 2 == r), the images are byte-identical to a single
process's, and a rerun takes what is in the cache, drawing only the deleted images again."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from processes import accelerate_launch, cli_env

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


def test_two_processes_share_class_images_identical_to_one_and_resume(tiny_model, tmp_path):
    """One process draws the class images; then 4 of the 5 are deleted and 2 processes rerun on that cache: each
    draws only the missing images of its share, they are byte-identical to the single process's, and the image that
    stayed is not rewritten."""
    from dsd_core.tiny import reference_image

    cat = tmp_path / "cat"
    cat.mkdir()
    for i in range(2):
        reference_image(48, 48, seed=i).save(cat / f"{i}.png")
    env = cli_env()  # one thread per process, MKL's reproducible path (see processes.py)
    cache = tmp_path / "class_cache"
    one = subprocess.run([sys.executable, "-m", "dsd_core", *_args(tiny_model, cat, tmp_path / "run_one", cache)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert _drawn(one.stdout) == {0: list(range(COUNT))}
    images = _images(cache)
    assert list(images) == [f"class_{k:04d}.png" for k in range(COUNT)]
    reference = {}
    for name, path in images.items():
        with open(path, "rb") as fh:
            reference[name] = fh.read()
    kept = os.stat(images["class_0000.png"])
    for k in range(1, COUNT):
        os.remove(images[f"class_{k:04d}.png"])

    two = subprocess.run(accelerate_launch(2) + ["-m", "dsd_core"] + _args(tiny_model, cat, tmp_path / "run_two", cache), env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes" in two.stdout
    # process r draws the missing k with k % 2 == r; image 0 comes from the cache
    assert _drawn(two.stdout) == {0: [2, 4], 1: [1, 3]}, two.stdout
    assert _images(cache) == images  # the same cache folder (same key), the same files
    for name, path in images.items():
        with open(path, "rb") as fh:
            assert fh.read() == reference[name], f"{name}: two processes drew other bytes than one process"
    now = os.stat(images["class_0000.png"])
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns), "the cached image was rewritten"
