"""The pipeline contract (tests/pipeline_contract.py) on every way of building a pipeline: the folder route, the
parity fixture, memory modes, speed modes, single files and GGUF. How close each mode is to the exact output is
tested in test_memory_modes.py / test_speed.py; here each must simply behave like a DSD pipeline."""

from __future__ import annotations

import importlib.util

import pytest

from dsd_core.memory import MemoryConfig, apply_memory
from dsd_core.speed import SpeedConfig
from pipeline_contract import PipelineContract


class TestFolderSource(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, tiny_pipe):
        return tiny_pipe


class TestParityFixture(PipelineContract):
    """The official-layout fixture at 256x512 with true guidance (what test_pipeline.py used to check by hand)."""

    settings = dict(height=256, width=512, image_guidance_scale=1.5)

    @pytest.fixture(scope="class")
    def pipe(self, fixture_pipe):
        return fixture_pipe


# ---------------------------------------------------------------------------------------------- memory modes
class TestFp8Transformer(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        return make_pipe(MemoryConfig(transformer_weights="fp8"))


class TestPreset12gb(PipelineContract):
    """fp8 weights with the LoRA fused in first (model offload is skipped on the CPU)."""

    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        return make_pipe(MemoryConfig.from_preset("12gb"))


class TestReleaseTextEncodersUnderModelOffload(PipelineContract):
    """Encoders freed after the first call, model offload hooks running on the CPU (the memory hook's two parts)."""

    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        pipe = make_pipe()
        apply_memory(pipe, MemoryConfig(offload="model", release_text_encoders=True), "cpu", allow_cpu_offload=True)
        return pipe


class TestGroupOffload(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        pipe = make_pipe()
        apply_memory(pipe, MemoryConfig(offload="group"), "cpu", allow_cpu_offload=True)
        return pipe


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (`pip install gguf`)")
class TestGGUF(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, make_pipe, tiny_model, tmp_path_factory):
        from dsd_core.memory import save_gguf
        from dsd_core.transformer import DSDTransformer2DModel

        state = DSDTransformer2DModel.from_pretrained(tiny_model["transformer"]).state_dict()
        path = save_gguf(state, str(tmp_path_factory.mktemp("gguf") / "dsd-Q8_0.gguf"), "Q8_0")
        return make_pipe(MemoryConfig(transformer_weights="gguf", gguf_file=path))


# ---------------------------------------------------------------------------------------------- speed modes
class TestFastMode(PipelineContract):
    """First Block Cache (state per guidance branch, reset per call)."""

    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        return make_pipe(speed=SpeedConfig.fast())


class TestGuidanceWindow(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, make_pipe):
        return make_pipe(speed=SpeedConfig(true_guidance_end=0.5))


# ---------------------------------------------------------------------------------------------- single files
class TestFilesSource(PipelineContract):
    @pytest.fixture(scope="class")
    def pipe(self, make_pipe, tmp_path_factory):
        from dsd_core.sources import FilesSource
        from dsd_core.tiny import write_tiny_comfy_files

        p = write_tiny_comfy_files(str(tmp_path_factory.mktemp("comfy") / "models"))
        return make_pipe(source=FilesSource(p["transformer"], p["clip_l"], p["t5xxl"], p["vae"], lora=p["lora"],
                                            tokenizers=p["tokenizers"]))

