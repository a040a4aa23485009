"""README's newcomer blocks, run as written in a folder with the name README's ``git clone`` gives (a hyphen in it).

The blocks (``<!-- install -->``, ``<!-- quickstart-tiny -->``, ``<!-- test-command -->``) are interpreted line by
line, in order, in one shell state (the working folder carries over): ``git clone URL`` copies this checkout into
``<tmp>/<name from URL>`` (no network), ``cd`` changes folder, ``python -m pip install`` is checked (it names torch
or this package with extras that exist) but not run (the environment is already installed; no reinstall, no
network), ``python -m pytest`` runs collection of the whole suite plus one test file (the full suite is what CI runs
through ``.ci/run``), and every other command runs as written through bash. Any other kind of command fails the test,
so a new README line gets a decision here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT
from readme_blocks import MARKERS, block, commands

#: the test file the README's pytest line is narrowed to (fast, and it runs a test, so the repo root's package
#: import path is exercised: collection alone does not import the root __init__.py)
ONE_TEST_FILE = "tests/test_canvas.py"


def _copy_checkout(dest: str) -> None:
    """This checkout's files (tracked and untracked, not ignored, as they are now) into ``dest``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                                capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns("__pycache__", ".git", "*.egg-info", "tiny*"))
        return
    for rel in filter(None, listed):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def _extras() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def _check_pip(argv: list[str]) -> None:
    assert argv[:4] == ["python", "-m", "pip", "install"], f"unexpected pip command {argv}"
    for spec in argv[4:]:
        if spec in ("-e", "--editable") or spec.startswith("-"):
            continue
        if spec == "torch":
            continue
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
        assert m, f"README installs {spec!r}: only torch and this package ('.[extras]') are expected"
        unknown = set((m.group(1) or "").split(",")) - {""} - _extras()
        assert not unknown, f"README installs extras {unknown} that pyproject.toml does not define"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd: str, cwd: str, timeout: float = 240) -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"README command failed in {cwd}:\n$ {cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_ci_runs_the_readme_test_block():
    """.ci/run runs the test block by reading it from README (so the two cannot differ)."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert re.search(r'^bash -euxo pipefail -c "\$\(python tests/readme_blocks.py test-command\)"$', ci, re.M), ci
    assert not re.search(r"^\s*python -m pytest", ci, re.M), ".ci/run must not call pytest itself"
    assert commands("test-command")[-1].startswith("python -m pytest"), "the test block must end with the tests"
    assert "pip install" in block("test-command"), "the test block must install the test extras"


def test_blocks_are_present_and_clone_into_a_hyphenated_folder():
    for marker in MARKERS:
        assert commands(marker), marker
    clone = [c for c in commands("install") if c.startswith("git clone ")]
    assert len(clone) == 1, "the install block clones the repository once"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    assert shlex.split(clone[0])[2] == url
    assert "-" in url.rstrip("/").rsplit("/", 1)[1]
    assert "https://download.pytorch.org/whl/cpu" in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


@pytest.mark.slow
def test_readme_blocks_pass_as_written_in_a_hyphenated_clone(tmp_path):
    work = tmp_path / "newcomer"
    work.mkdir()
    cwd = str(work)
    clone_dir = None
    ran = []
    for marker in MARKERS:
        for cmd in commands(marker):
            argv = shlex.split(cmd)
            if argv[:2] == ["git", "clone"]:
                name = argv[3] if len(argv) > 3 else argv[2].rstrip("/").rsplit("/", 1)[1].removesuffix(".git")
                clone_dir = os.path.join(cwd, name)
                _copy_checkout(clone_dir)
            elif argv[0] == "cd":
                assert len(argv) == 2, cmd
                cwd = os.path.normpath(os.path.join(cwd, argv[1]))
                assert os.path.isdir(cwd), f"README's `{cmd}` goes to a folder that does not exist"
            elif argv[:3] == ["python", "-m", "pip"]:
                _check_pip(argv)
            elif argv[:3] == ["python", "-m", "pytest"]:
                assert cwd == clone_dir, "the tests run from the clone"
                summary = _run(cmd + " --collect-only", cwd).strip().splitlines()[-1]
                assert re.match(r"\d{2,} tests collected in", summary), summary
                summary = _run(f"{cmd} {ONE_TEST_FILE} -p no:cacheprovider", cwd).strip().splitlines()[-1]
                assert re.match(r"\d+ passed in", summary), summary
            elif argv[:3] == ["python", "-m", "dsd_core"]:
                assert cwd == clone_dir, "the quickstart runs from the clone"
                _run(cmd, cwd)
            else:
                pytest.fail(f"README block <!-- {marker} --> has a command this test does not know: {cmd}")
            ran.append(cmd)
    assert clone_dir and "-" in os.path.basename(clone_dir)
    # the quickstart's output exists and is an image of the canvas' right half
    import PIL.Image

    outs = [a for c in commands("quickstart-tiny") for a in [shlex.split(c)] if "--out" in a]
    assert outs, "the quickstart writes an image"
    out = outs[-1][outs[-1].index("--out") + 1]
    with PIL.Image.open(os.path.join(clone_dir, out)) as im:
        assert im.size == (512, 512)
    assert ran
