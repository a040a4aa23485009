"""Task-specific distillation (dsd_core.distill): student construction, importance, losses, evaluation.

Tiny random models of the real architecture; a deeper tiny teacher (4 double + 6 single blocks) so presets prune.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsd_core.distill.data import Canvas, InputSampling, collate_canvases, noisy_inputs
from dsd_core.distill.evaluate import (estimated_memory, estimated_step_ratio, full_size_table, output_agreement,
                                       psnr)
from dsd_core.distill.features import BlockRecorder
from dsd_core.distill.importance import block_importance
from dsd_core.distill.layout import StudentLayout, parse_indices, uniform_indices
from dsd_core.distill.losses import DistillWeights, distillation_loss, feature_distance
from dsd_core.distill.student import (build_student, count_params, load_student, read_student_info, save_student,
                                      student_info)
from dsd_core.errors import InputError
from dsd_core.tiny import TRANSFORMER_CONFIG
from dsd_core.transformer import DSDTransformer2DModel

DEEP = dict(TRANSFORMER_CONFIG, num_layers=4, num_single_layers=6)


def make_teacher(seed: int = 0):
    torch.manual_seed(seed)
    t = DSDTransformer2DModel(**DEEP)
    with torch.no_grad():
        t.c_embedder.weight.normal_(0, 0.2)
    return t.eval().requires_grad_(False)


def make_canvases(n: int = 3, seed: int = 0, tokens: int = 32, text: int = 8):
    g = torch.Generator().manual_seed(seed)
    d = TRANSFORMER_CONFIG["joint_attention_dim"]
    p = TRANSFORMER_CONFIG["pooled_projection_dim"]
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // 8
    img_ids[:, 2] = torch.arange(tokens) % 8
    out = []
    for _ in range(n):
        out.append(Canvas(latents=torch.randn(1, tokens, 64, generator=g), condition=torch.randn(1, tokens, 64, generator=g),
                          prompt_embeds=torch.randn(1, text, d, generator=g), pooled=torch.randn(1, p, generator=g),
                          empty_embeds=torch.randn(1, text, d, generator=g) * 0.1,
                          empty_pooled=torch.randn(1, p, generator=g) * 0.1, text_ids=torch.zeros(text, 3),
                          img_ids=img_ids))
    return out


def inputs_for(canvases, seed: int = 1, **kw):
    g = torch.Generator().manual_seed(seed)
    return [noisy_inputs(c, g, **kw)[0] for c in canvases]


# ---------------------------------------------------------------------------------------------- layouts
def test_presets_on_the_full_size_layout():
    q = StudentLayout.from_preset("quarter", 19, 38)
    assert (len(q.double), len(q.single)) == (5, 10)  # Flux-Mini's 5 + 10
    assert q.double[0] == 0 and q.double[-1] == 18 and q.single[-1] == 37
    h = StudentLayout.from_preset("half", 19, 38)
    assert (len(h.double), len(h.single)) == (10, 19)
    assert StudentLayout.from_preset("full", 19, 38).keeps_all
    assert uniform_indices(5, 1) == [0]


def test_custom_lists_and_bad_input():
    assert parse_indices("0-2,5", 6, "double") == [0, 1, 2, 5]
    with pytest.raises(InputError, match="does not exist"):
        parse_indices([0, 7], 6, "double")
    with pytest.raises(InputError, match="twice"):
        parse_indices("1,1", 6, "double")
    with pytest.raises(InputError, match="cannot read"):
        parse_indices("a-b", 6, "double")
    with pytest.raises(InputError, match="importance scores"):
        StudentLayout.from_preset("half", 4, 6, "importance")
    with pytest.raises(InputError, match="unknown student preset"):
        StudentLayout.from_preset("tenth", 4, 6)


def test_feature_map_segment_end_and_same():
    layout = StudentLayout.from_lists([0, 2], [1, 4], 4, 6)
    assert layout.feature_map() == [("transformer_blocks.0", "transformer_blocks.1"),
                                    ("transformer_blocks.1", "transformer_blocks.3"),
                                    ("single_transformer_blocks.0", "single_transformer_blocks.3"),
                                    ("single_transformer_blocks.1", "single_transformer_blocks.5")]
    assert layout.feature_map("same")[1] == ("transformer_blocks.1", "transformer_blocks.2")


# ---------------------------------------------------------------------------------------------- construction
def test_student_keeping_all_blocks_reproduces_the_teacher_exactly():
    teacher = make_teacher()
    student = build_student(teacher, StudentLayout.for_teacher(teacher, "full"))
    assert count_params(student) == count_params(teacher)
    for kw in inputs_for(make_canvases(2), branch="text_image") + inputs_for(make_canvases(1), branch="uncond"):
        assert torch.equal(student(**kw)[0], teacher(**kw)[0])
    # the copy is independent: training the student never moves the teacher
    with torch.no_grad():
        student.c_embedder.weight.add_(1.0)
    assert not torch.equal(student.c_embedder.weight, teacher.c_embedder.weight)


def test_pruned_student_takes_the_teachers_kept_blocks():
    teacher = make_teacher()
    layout = StudentLayout.from_lists([1, 3], [0, 5], 4, 6)
    student = build_student(teacher, layout)
    assert (student.config.num_layers, student.config.num_single_layers) == (2, 2)
    s, t = student.state_dict(), teacher.state_dict()
    for name in ("transformer_blocks.1.attn.to_q.weight", "single_transformer_blocks.1.proj_out.weight"):
        src = name.replace("transformer_blocks.1.", "transformer_blocks.3.") if name.startswith("t") else \
            name.replace("single_transformer_blocks.1.", "single_transformer_blocks.5.")
        assert torch.equal(s[name], t[src])
    assert torch.equal(s["c_embedder.weight"], t["c_embedder.weight"])
    assert count_params(student) < count_params(teacher)
    with pytest.raises(InputError, match="layout was made"):
        build_student(teacher, StudentLayout.from_lists([0], [0], 5, 6))


def test_student_refuses_a_teacher_with_an_unfused_lora():
    from dsd_core.tiny import LORA_TARGETS
    from peft import LoraConfig

    teacher = make_teacher()
    teacher.add_adapter(LoraConfig(r=2, target_modules=LORA_TARGETS))
    with pytest.raises(InputError, match="fuse"):
        build_student(teacher, StudentLayout.for_teacher(teacher, "half"))


def test_save_load_round_trip_folder_and_single_file(tmp_path):
    teacher = make_teacher()
    layout = StudentLayout.for_teacher(teacher, "quarter")
    student = build_student(teacher, layout)
    info = student_info(student, layout, count_params(teacher), teacher="tiny")
    folder = save_student(student, str(tmp_path / "student"), info, single_file=str(tmp_path / "student.safetensors"))
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors", "student.json"]
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["num_layers"] == len(layout.double)
    kw = inputs_for(make_canvases(1))[0]
    want = student(**kw)[0]
    for path in (folder, str(tmp_path / "student.safetensors")):
        loaded, rec = load_student(path)
        assert rec["kept_double"] == list(layout.double) and rec["params"] == count_params(student)
        assert rec["teacher_params"] == count_params(teacher) and rec["teacher"] == "tiny"
        assert torch.equal(loaded(**kw)[0], want)
    teacher.save_pretrained(str(tmp_path / "plain"))
    assert read_student_info(str(tmp_path / "plain")) is None  # an ordinary DSD transformer is not a student
    with pytest.raises(FileExistsError):
        save_student(student, folder, info)


# ---------------------------------------------------------------------------------------------- importance
def test_importance_scores_a_no_op_block_zero():
    teacher = make_teacher()
    with torch.no_grad():  # single block 2 adds nothing: its output projection is zero
        teacher.single_transformer_blocks[2].proj_out.weight.zero_()
        teacher.single_transformer_blocks[2].proj_out.bias.zero_()
    scores = block_importance(teacher, inputs_for(make_canvases(2)))
    assert len(scores["double"]) == 4 and len(scores["single"]) == 6
    assert scores["single"][2] == 0.0
    assert all(s > 0 for i, s in enumerate(scores["single"]) if i != 2) and all(s > 0 for s in scores["double"])
    layout = StudentLayout.from_preset("half", 4, 6, "importance", scores)
    assert 2 not in layout.single and layout.single[0] == 0
    assert layout.double == tuple(sorted([0] + [max(range(1, 4), key=lambda i: scores["double"][i])]))


# ---------------------------------------------------------------------------------------------- losses
def test_feature_distance_handles_massive_activations():
    g = torch.Generator().manual_seed(0)
    h_t = torch.randn(2, 16, 32, generator=g)
    h_s = h_t + 0.1 * torch.randn(2, 16, 32, generator=g)
    base = {m: float(feature_distance(h_s, h_t, m)) for m in ("normalize", "mask", "none")}
    big_t, big_s = h_t.clone(), h_s.clone()
    big_t[..., 3] = 1e4 * (1 + big_t[..., 3].abs())  # a massive channel, with a proportional student error
    big_s[..., 3] = big_t[..., 3] * 1.01
    plain = float(feature_distance(big_s, big_t, "none"))
    assert plain > 1e4 * base["none"]  # the plain MSE is dominated by one channel
    assert float(feature_distance(big_s, big_t, "normalize")) < 2 * base["normalize"]
    assert float(feature_distance(big_s, big_t, "mask")) == pytest.approx(
        float(((h_s - h_t).pow(2)[..., [i for i in range(32) if i != 3]]).mean()), rel=1e-4)
    with pytest.raises(InputError):
        DistillWeights(massive="clip")


def test_distillation_loss_terms_and_recorder_streams():
    teacher = make_teacher()
    layout = StudentLayout.for_teacher(teacher, "half")
    student = build_student(teacher, layout)
    pairs = layout.feature_map()
    g = torch.Generator().manual_seed(0)
    kw, target = noisy_inputs(make_canvases(1)[0], g)
    with BlockRecorder(student, [s for s, _ in pairs]) as rs, BlockRecorder(teacher, [t for _, t in pairs]) as rt:
        v_s, v_t = student(**kw)[0], teacher(**kw)[0]
    txt, img = rt.outputs["transformer_blocks.3"]
    assert txt.shape[1] == kw["encoder_hidden_states"].shape[1] and img.shape[1] == kw["hidden_states"].shape[1]
    terms = distillation_loss(v_s, v_t, target, rs.outputs, rt.outputs, pairs, DistillWeights(flow=1, out=2, feat=3))
    assert float(terms["loss"]) == pytest.approx(float(terms["flow"] + 2 * terms["out"] + 3 * terms["feat"]), rel=1e-6)
    assert float(terms["out"]) > 0 and float(terms["feat"]) > 0
    full = build_student(teacher, StudentLayout.for_teacher(teacher, "full"))
    fp = StudentLayout.for_teacher(teacher, "full").feature_map()
    with BlockRecorder(full, [s for s, _ in fp]) as rf, BlockRecorder(teacher, [t for _, t in fp]) as rt2:
        terms = distillation_loss(full(**kw)[0], teacher(**kw)[0], None, rf.outputs, rt2.outputs, fp)
    assert float(terms["out"]) == 0 and float(terms["feat"]) == 0 and float(terms["flow"]) == 0


def test_noisy_inputs_sample_the_guidance_branches():
    c = make_canvases(1)[0]
    g = torch.Generator().manual_seed(0)
    kw, target = noisy_inputs(c, g, sigma=0.25, branch="uncond", guidance=2.0)
    assert torch.count_nonzero(kw["condition_hidden_states"]) == 0
    assert torch.equal(kw["encoder_hidden_states"], c.empty_embeds) and float(kw["guidance"][0]) == 2.0
    assert torch.allclose(target, kw["hidden_states"] / 0.25 - 0.75 / 0.25 * c.latents - c.latents, atol=1e-5)
    kw, _ = noisy_inputs(c, g, branch="image")
    assert torch.equal(kw["encoder_hidden_states"], c.empty_embeds)
    assert torch.equal(kw["condition_hidden_states"], c.condition)
    kw, _ = noisy_inputs(c, g, branch="text_image")
    assert torch.equal(kw["encoder_hidden_states"], c.prompt_embeds) and torch.equal(kw["pooled_projections"], c.pooled)
    sampling = InputSampling(guidance_range=(2.0, 5.0), branch_probs=(1, 1, 1))
    seen = [noisy_inputs(c, g, sampling) for _ in range(30)]
    gs = [float(k["guidance"][0]) for k, _ in seen]
    assert 2.0 <= min(gs) < max(gs) <= 5.0
    assert len({torch.equal(k["encoder_hidden_states"], c.empty_embeds) for k, _ in seen}) == 2
    # a batch: one draw per sample, the same stream of random numbers on every run (exact resume)
    batch = collate_canvases(make_canvases(4))
    a, _ = noisy_inputs(batch, torch.Generator().manual_seed(3), sampling)
    b, _ = noisy_inputs(batch, torch.Generator().manual_seed(3), sampling)
    assert torch.equal(a["hidden_states"], b["hidden_states"]) and a["timestep"].unique().numel() == 4
    with pytest.raises(InputError):
        InputSampling(branch_probs=(1, 0))


# ---------------------------------------------------------------------------------------------- evaluation
def test_full_size_memory_and_speed_estimates():
    rows = {r["preset"]: r for r in full_size_table()}
    assert rows["full"]["params"] == 11_901_408_320 + 199_680
    assert 3.1e9 < rows["quarter"]["params"] < 3.3e9  # Flux-Mini reports 3.2 B for 5 + 10 blocks
    assert rows["quarter"]["peak_full"] < rows["half"]["peak_full"] < rows["full"]["peak_full"]
    assert rows["quarter"]["denoise_12gb"] < rows["half"]["denoise_12gb"] < rows["full"]["denoise_12gb"]
    assert estimated_step_ratio(19, 38) == 1.0 and 0.2 < estimated_step_ratio(5, 10) < 0.3
    # the full teacher through this path equals the memory model's own estimate with the LoRA fused
    from dsd_core.memory import MemoryConfig, estimate

    assert estimated_memory(19, 38).peak == pytest.approx(
        estimate(MemoryConfig.from_preset("full", fuse_lora=True), lora_bytes=0).peak)


def test_output_agreement_and_psnr():
    teacher = make_teacher()
    inputs = inputs_for(make_canvases(2))
    same = output_agreement(build_student(teacher, StudentLayout.for_teacher(teacher, "full")), teacher,
                            StudentLayout.for_teacher(teacher, "full"), inputs)
    assert same == {"velocity_rel_mse": 0.0, "feature_distance": 0.0}
    layout = StudentLayout.for_teacher(teacher, "quarter")
    pruned = output_agreement(build_student(teacher, layout), teacher, layout, inputs)
    assert pruned["velocity_rel_mse"] > 0 and pruned["feature_distance"] > 0
    a = torch.rand(1, 3, 8, 8)
    assert psnr(a, a) == float("inf") and 10 < psnr(a, (a + 0.1).clamp(0, 1)) < 30


def test_readme_distill_table_matches_the_estimates():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                  encoding="utf-8").read()
    block = readme.split("<!-- distill-table -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = [r.split("|")[1:-1] for r in block.splitlines()[2:]]
    for cells, preset in zip(rows, ("full", "half", "quarter")):
        layout = StudentLayout.from_preset(preset, 19, 38)
        nd, ns = len(layout.double), len(layout.single)
        assert cells[1].strip() == f"{nd} + {ns}"
        from dsd_core.distill.evaluate import full_size_transformer

        size = full_size_transformer(nd, ns)
        assert cells[2].strip().startswith(f"{size.params / 1e9:.2f} B")
        assert cells[3].strip() == f"{size.weight_bytes('bf16') / 1e9:.1f} GB"
        assert cells[4].strip() == f"{size.weight_bytes('gguf-Q4_K') / 1e9:.1f} GB"
        assert cells[5].strip() == f"{estimated_memory(nd, ns, 'full').peak:.1f} GiB"
        for col, mode in ((6, "12gb"), (7, "8gb")):  # the transformer phase, with the CUDA context
            assert cells[col].strip() == f"{estimated_memory(nd, ns, mode).phases['denoise'] + 0.4:.1f} GiB"
        assert cells[8].strip() == f"{estimated_step_ratio(nd, ns):.2f}x"
