"""Shared test setup: no network, tiny models built offline, the parity fixture.

Every test runs with the Hugging Face libraries in offline mode and with a socket guard that fails any connection
to a non-loopback address, so a test that would touch the internet fails instead.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
PARITY = os.path.join(DATA, "parity")
FIXTURE = os.path.join(PARITY, "fixture")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DO_NOT_TRACK",
             "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_var] = "1"


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests must stay on 127.0.0.1")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests must stay on 127.0.0.1")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


class _RepoRootIsNotATestPackage:
    """Collect the repository root as a plain directory, not as a Python test package.

    The root holds ComfyUI's entry point ``__init__.py`` (ComfyUI imports the folder as a package), so pytest >= 8
    collects the root as a ``Package`` and imports that ``__init__.py`` before the first test (looking for
    ``setup_module``), under a module name made from the folder's name. README's ``git clone`` makes the folder
    ``ComfyUI-SelfDistill``: the hyphen is not a valid module name, so pytest imports the file as a top-level module
    ``__init__`` and its relative import fails, erroring every test. Nothing at the root is a test, so it is
    collected as a ``pytest.Dir``, which imports nothing; ``tests/`` and below are collected as before.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if os.path.samefile(path, ROOT):
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # A plugin, not a hook of this conftest: conftest hooks only apply below tests/, the root is collected first.
    if not config.pluginmanager.has_plugin("dsd-repo-root-not-a-package"):
        config.pluginmanager.register(_RepoRootIsNotATestPackage(), "dsd-repo-root-not-a-package")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)  # the parity goldens were made with 2 threads


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """Paths of a tiny DSD model set written by ``dsd_core.tiny.write_tiny_model`` (session-wide)."""
    from dsd_core.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def fixture_pipe():
    """The parity fixture (tiny official-layout DSD model set) as a float32 DSDPipeline on CPU."""
    from dsd_core.loading import load_pipeline

    pipe = load_pipeline(base=os.path.join(FIXTURE, "base"), model=os.path.join(FIXTURE, "dsd"), dtype="float32",
                         device="cpu", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    """The tiny model set as a float32 DSDPipeline on CPU."""
    from dsd_core.loading import load_pipeline

    pipe = load_pipeline(base=tiny_model["base"], model=tiny_model["model"], dtype="float32", device="cpu",
                         local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def reference_image():
    from dsd_core.image import prepare_reference
    from dsd_core.tiny import reference_image as make

    return prepare_reference(make(seed=5))
