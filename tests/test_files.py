"""Files the package writes get the user's umask (not mkstemp's 0600) and appear atomically."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from dsd_core import files


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o640
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask_027):
    assert files.current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # unchanged by the read
    assert files.file_mode() == 0o640 and files.dir_mode() == 0o750


def test_atomic_writers_use_the_umask(tmp_path, umask_027):
    files.write_text(str(tmp_path / "a" / "note.txt"), "hi")
    files.save_safetensors({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    with files.atomic_path(str(tmp_path / "p.bin")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
        os.chmod(tmp, 0o600)  # whatever the writer does, the result gets the umask's mode
    for name in ("a/note.txt", "w.safetensors", "p.bin"):
        assert _mode(tmp_path / name) == umask_027, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "p.bin", "w.safetensors"]  # no temp files left


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(str(target), "w", encoding="utf-8") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_cli_png_gets_the_umask(tmp_path, umask_027):
    import PIL.Image

    from dsd_core.commands.generate import save_png

    out = tmp_path / "o.png"
    save_png(PIL.Image.new("RGB", (4, 4)), str(out), {"seed": 0})
    assert _mode(out) == umask_027
    with PIL.Image.open(out) as im:
        assert im.text["dsd"] == '{"seed": 0}'


def test_tiny_model_files_get_the_umask(tiny_model):
    """The session's tiny set was written under the default umask: no 0600 safetensors, no 0700 folder."""
    root = os.path.dirname(tiny_model["model"])
    fmode, dmode = files.file_mode(), files.dir_mode()
    checked = 0
    for dirpath, dirs, names in os.walk(root):
        assert _mode(dirpath) == dmode, dirpath
        for n in names:
            assert _mode(os.path.join(dirpath, n)) == fmode, os.path.join(dirpath, n)
            checked += n.endswith(".safetensors")
    assert checked >= 6


def test_apply_umask_keeps_executables_executable(tmp_path, umask_027):
    (tmp_path / "t").mkdir(mode=0o700)
    script = tmp_path / "t" / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o700)
    (tmp_path / "t" / "data").write_text("x")
    os.chmod(tmp_path / "t" / "data", 0o600)
    files.apply_umask(str(tmp_path / "t"))
    assert (_mode(tmp_path / "t"), _mode(script), _mode(tmp_path / "t" / "data")) == (0o750, 0o750, 0o640)
