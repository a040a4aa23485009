"""The memory model of full-size DSD (built on the meta device) against the known numbers.

Known table: shared/docs/offline-testing.md section 4 (full-size components built on the meta device; only
``nn.Linear`` weights quantized for fp8/NF4, NF4 with one fp32 absmax per 64 weights). Measured anchors:
no offload 33-34 GB (ComfyUI-DSD #2), model offload ~23.7 GB (DSD README).
"""

from __future__ import annotations

import pytest

from dsd_core.memory import PRESETS, MemoryConfig, component_sizes, estimate, preset_table
from dsd_core.memory.estimator import (ACTIVATION_FACTOR, DSD_LORA_FILE_BYTES, GIB, component_table,
                                      denoise_activation_bytes, lora_params)

# component -> (params, bf16 GiB, fp8 GiB, NF4 GiB, fp32 GiB) from offline-testing.md section 4 (plain FLUX
# transformer: 11,901,408,320; DSD adds c_embedder = Linear(64, 3072): 64 * 3072 + 3072 = 199,680).
KNOWN = {
    "transformer": (11_901_408_320 + 199_680, 22.17, 11.09, 6.24, 44.34),
    "t5": (4_762_310_656, 8.87, 4.56, 2.67, 17.74),
    "clip": (123_060_480, 0.23, 0.15, 0.12, 0.46),
    "vae": (83_819_683, 0.16, 0.15, 0.15, 0.31),
}


@pytest.fixture(scope="module")
def sizes():
    return component_sizes()


@pytest.mark.parametrize("name", list(KNOWN))
def test_components_match_the_known_table(sizes, name):
    params, bf16, fp8, nf4, fp32 = KNOWN[name]
    s = sizes[name]
    assert s.params == params
    for fmt, want in (("bf16", bf16), ("fp8-linear", fp8), ("nf4", nf4), ("fp32", fp32)):
        assert round(s.gib(fmt), 2) == want, (name, fmt, s.gib(fmt))


def test_shipped_sizes_are_the_meta_build(sizes):
    """The shipped component_sizes.json (read by the estimator, so `memory` needs no torch) equals a fresh build."""
    from dsd_core.memory.estimator import measure_component_sizes

    assert sizes == measure_component_sizes(), \
        "regenerate: python -c 'from dsd_core.memory.estimator import write_component_sizes; write_component_sizes()'"


def test_totals_and_blocks(sizes):
    assert round(sum(s.gib("bf16") for s in sizes.values()), 2) == 31.42
    assert round(sum(s.gib("fp8-linear") for s in sizes.values()), 2) == 15.95
    assert round(sum(s.gib("nf4") for s in sizes.values()), 2) == 9.18
    tr = sizes["transformer"]
    assert tr.blocks == 19 + 38
    assert round(tr.largest_block / 1e6, 1) == 339.8  # a double block; single blocks hold 141.6 M
    assert 19 * 339.8e6 + 38 * 141.6e6 == pytest.approx(tr.params - tr.non_block, rel=2e-4)
    # our fp8 keeps the embedders and output layers in bf16: 64 M parameters, 0.06 GiB more than all-linear fp8
    assert 0 < tr.gib("fp8") - tr.gib("fp8-linear") < 0.07


def test_lora_sizes():
    assert round(lora_params(4) / 1e6, 1) == 6.5 and lora_params(16) == pytest.approx(26.2e6, rel=0.005)
    assert round(lora_params(64) / 1e6, 1) == 104.6
    # the 418 MB DSD LoRA is what rank 128 on the attention projections weighs in bf16
    assert lora_params(128) * 2 == pytest.approx(DSD_LORA_FILE_BYTES, rel=0.01)


def test_activation_formula():
    one = denoise_activation_bytes()
    assert one == ACTIVATION_FACTOR * 2560 * 3072 * 2
    assert 0.2 < one / GIB < 0.3
    assert denoise_activation_bytes(batch=3) == 3 * one
    assert denoise_activation_bytes(attention="math") > one + 24 * 2560**2 * 2


def test_preset_targets():
    peaks = {p: estimate(MemoryConfig.from_preset(p)).peak for p in PRESETS}
    assert 32 <= peaks["full"] <= 35  # measured 33-34 GB without offload
    assert 22.5 <= peaks["24gb"] <= 24 and MemoryConfig.from_preset("24gb").transformer_weights == "native"
    assert peaks["12gb"] <= 12 and estimate(MemoryConfig.from_preset("12gb")).formats["transformer"] == "fp8"
    assert peaks["8gb"] <= 8 and estimate(MemoryConfig.from_preset("8gb")).formats["transformer"] == "nf4"
    assert peaks["lowest"] <= 4 and estimate(MemoryConfig.from_preset("lowest")).config.offload == "group"
    assert list(peaks.values()) == sorted(peaks.values(), reverse=True)


def test_estimate_details():
    e = estimate(MemoryConfig.from_preset("24gb"))
    assert max(e.phases, key=e.phases.get) == "denoise"
    assert e.weights["lora"] == pytest.approx(DSD_LORA_FILE_BYTES / GIB)
    assert estimate(MemoryConfig.from_preset("12gb")).weights["lora"] == 0  # fused
    full = estimate(MemoryConfig.from_preset("full"))
    assert full.transfer_gib == 0 and full.host_ram < 3
    released = estimate(MemoryConfig(release_text_encoders=True))
    assert released.phases["denoise"] < full.phases["denoise"] - 9  # T5 + CLIP gone after encoding
    batched = estimate(MemoryConfig.from_preset("24gb"), true_guidance=True, batch_true_guidance=True)
    assert batched.activations == pytest.approx(3 * e.activations)
    seq = estimate(MemoryConfig.from_preset("lowest"), true_guidance=True)
    assert seq.transfer_gib > estimate(MemoryConfig.from_preset("lowest")).transfer_gib * 2.5  # 80 passes instead of 28
    q8 = estimate(MemoryConfig(transformer_weights="gguf", gguf_file="dsd-Q8_0.gguf"))
    assert q8.formats["transformer"] == "gguf-Q8_0" and round(q8.weights["transformer"], 2) == 11.78


def test_tables_render():
    table = preset_table()
    for name in ("full", "24gb", "16gb", "12gb", "8gb", "lowest"):
        assert f"| {name} |" in table
    assert table.count("\n") == 8 and "| 8gb with GGUF Q4_K |" in table
    assert "| **total (no LoRA)** | 16,870,798,819 | **31.42** |" in component_table()


def test_readme_memory_table_is_the_models_output():
    """README's memory table is exactly what the memory model prints now."""
    import os

    from dsd_core.memory import preset_table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme.split("<!-- memory-table -->", 1)[1].strip().split("\n\n", 1)[0]
    assert block == preset_table().strip()
