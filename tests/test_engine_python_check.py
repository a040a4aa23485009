"""The engine tier skips (fails under CI=true) with a reason when its Python cannot run the engine (issue #10)."""

from __future__ import annotations

import sys

import pytest

from engine import conftest as engine_conftest


def _engine(tmp_path, requirements: str):
    (tmp_path / "requirements.txt").write_text(requirements)
    (tmp_path / "main.py").write_text("")
    return engine_conftest.EngineSpec("ci", tmp_path, sys.executable)


def test_missing_requirement_is_named(tmp_path):
    spec = _engine(tmp_path, "torch\nnumpy>=1.25.0\ndsd-no-such-package-xyz==1.0  # comment\ncomfyui-embedded-docs==1\n")
    problem = engine_conftest.python_problem(spec)
    assert problem == "missing packages: dsd-no-such-package-xyz"  # UI-only packages are not required


def test_installed_requirements_pass(tmp_path):
    assert engine_conftest.python_problem(_engine(tmp_path, "torch\nnumpy\n")) is None


def test_resolve_engine_skips_locally_and_fails_in_ci(tmp_path, monkeypatch):
    _engine(tmp_path, "dsd-no-such-package-xyz\n")
    monkeypatch.setenv("DSD_COMFY_ENGINE_DIR", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot run in .*missing packages: dsd-no-such-package-xyz"):
        engine_conftest.resolve_engine("ci")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and ComfyUI engine ci"):
        engine_conftest.resolve_engine("ci")
