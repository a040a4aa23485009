"""Shared test setup: no network, tiny models built offline, the parity fixture.

Every test runs with the Hugging Face libraries in offline mode and with a network guard (``tests/netguard.py``) that
fails any name lookup or connection to a non-loopback address, so a test that would touch the internet fails instead.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
PARITY = os.path.join(DATA, "parity")
FIXTURE = os.path.join(PARITY, "fixture")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "tests"))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DO_NOT_TRACK",
             "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[_var] = "1"

import netguard  # noqa: E402  (tests/netguard.py, shared with the engine launcher)

netguard.install()


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)  # the parity goldens were made with 2 threads


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """Paths of a tiny DSD model set written by ``dsd_core.tiny.write_tiny_model`` (session-wide)."""
    from dsd_core.tiny import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


#: The standard small run of the tests: 64x128 canvas, 3 steps, true guidance on at step 2 (the reference's start).
RUN = dict(prompt="a red toy", height=64, width=128, num_inference_steps=3, seed=1, output_type="pt",
           image_guidance_scale=2.0)


def run(pipe, image, **overrides):
    """The one way tests call a pipeline: :data:`RUN` with ``overrides`` (returns the output)."""
    return pipe(image, **{**RUN, **overrides})


@pytest.fixture(scope="session")
def make_pipe(tiny_model):
    """The one tiny-pipeline factory: ``make_pipe(memory=None, speed=None, dtype="float32", **load_pipeline_kwargs)``
    loads the tiny model set (or ``base=``/``model=``/``source=`` given) on the CPU, offline, progress bars off."""
    from dsd_core.loading import load_pipeline

    def make(memory=None, speed=None, dtype="float32", device="cpu", source=None, **kw):
        if source is None:
            kw = {"base": tiny_model["base"], "model": tiny_model["model"], "local_files_only": True, **kw}
        pipe = load_pipeline(source=source, memory=memory, speed=speed, dtype=dtype, device=device, **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def fixture_pipe(make_pipe):
    """The parity fixture (tiny official-layout DSD model set) as a float32 DSDPipeline on CPU."""
    return make_pipe(base=os.path.join(FIXTURE, "base"), model=os.path.join(FIXTURE, "dsd"))


@pytest.fixture(scope="session")
def tiny_pipe(make_pipe):
    """The tiny model set as a float32 DSDPipeline on CPU."""
    return make_pipe()


@pytest.fixture(scope="session")
def reference_image():
    """The one reference of the tests: the tiny set's synthetic picture (seed 5) fitted to a 512 panel; the
    pipeline fits it to smaller panels itself (center crop + bicubic, like the reference)."""
    from dsd_core.image import prepare_reference
    from dsd_core.tiny import reference_image as make

    return prepare_reference(make(seed=5))
