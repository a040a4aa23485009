"""Distillation as a method of the training engine, on tiny models: loss and agreement, resume, the student in the
pipeline, and the on-device chain distil -> quantise -> personalise -> generate."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsd_core.distill.layout import StudentLayout
from dsd_core.distill.student import build_student, load_teacher, read_student_info
from dsd_core.errors import InputError
from dsd_core.memory import MemoryConfig
from dsd_core.training import TrainConfig, Trainer, TrainingCancelled, get_method
from dsd_core.training.data import load_pairs

DEEP = dict(num_layers=4, num_single_layers=4)
PANEL = 64


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A deeper tiny DSD teacher (4 + 4 blocks, with a LoRA), and paired data of 64 px panels."""
    from dsd_core.tiny import TRANSFORMER_CONFIG, lora_state_dict, reference_image, save_lora
    from dsd_core.transformer import DSDTransformer2DModel

    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = DSDTransformer2DModel(**dict(TRANSFORMER_CONFIG, **DEEP))
    with torch.no_grad():
        teacher.c_embedder.weight.normal_(0, 0.2)
        for name, p in teacher.named_parameters():  # blocks that matter: random tiny blocks barely move the output
            if "transformer_blocks" in name and p.ndim == 2:
                p.mul_(3.0)
    model = root / "teacher"
    teacher.save_pretrained(str(model / "transformer"))
    lora, meta = lora_state_dict(teacher, seed=1)
    save_lora(str(model / "pytorch_lora_weights.safetensors"), lora, meta)
    data = root / "data"
    data.mkdir()
    lines = []
    for k in range(6):
        reference_image(64, 64, seed=10 + k).save(data / f"r{k}.png")
        reference_image(64, 64, seed=20 + k).save(data / f"t{k}.png")
        lines.append(json.dumps({"reference": f"r{k}.png", "target": f"t{k}.png", "caption": "a photo of the cat"}))
    (data / "metadata.jsonl").write_text("\n".join(lines[:4]) + "\n")
    held = root / "held_out"
    held.mkdir()
    for k in (4, 5):
        for p in (f"r{k}.png", f"t{k}.png"):
            os.replace(data / p, held / p)
    (held / "metadata.jsonl").write_text("\n".join(lines[4:]) + "\n")
    return dict(base=tiny_model["base"], model=str(model), data=str(data), held_out=str(held), root=root)


def config(setup, out, **kw):
    base = dict(data=setup["data"], base=setup["base"], model=setup["model"], output=str(out), panel_size=PANEL,
                min_image_size=16, max_steps=12, lr=2e-3, cpu=True, checkpoint_every=0, validate_every=0,
                local_files_only=True, batch_size=2, keep_checkpoints=0)
    base.update(kw)
    return TrainConfig(**base)


def method(cfg, **kw):
    cls = get_method("distill")
    return cls(cfg, cls.Options(max_sequence_length=16, **kw))


def test_distillation_lowers_the_loss_and_brings_the_student_closer_to_the_teacher(setup, tmp_path):
    # knowledge distillation alone (lambda_flow 0): a random tiny teacher does not model the data, so the flow term
    # would pull the student away from it; with real models all three terms are on by default
    cfg = config(setup, tmp_path / "out", max_steps=10, lr=5e-4)
    m = method(cfg, preset="quarter", lambda_flow=0.0)
    m.load(torch.device("cpu"), torch.float32)
    held = load_pairs(setup["held_out"])
    inputs = m.eval_inputs(held, seed=0)
    before = m.agreement(inputs)
    batch = m.collate([m.encode_item(r) for r in held])
    def held_out_loss():  # the objective on held-out pairs, averaged over four draws of noise / level / branch
        with torch.no_grad():
            return sum(float(m.loss_terms(m.student, batch, torch.Generator().manual_seed(s))["loss"])
                       for s in range(4)) / 4

    loss_before = held_out_loss()
    result = Trainer(cfg, m, progress_bar=False).train()
    assert result.step == 10 and len(result.losses) == 10
    m.student.eval()
    after = m.agreement(inputs)
    loss_after = held_out_loss()
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    assert after["velocity_rel_mse"] < 0.8 * before["velocity_rel_mse"], (before, after)
    assert after["feature_distance"] < before["feature_distance"], (before, after)
    # the artifact: an ordinary DSD transformer folder with the student record, the LoRA counted as fused
    info = read_student_info(str(tmp_path / "out" / "transformer"))
    assert info["kept_double"] == [0] and info["kept_single"] == [0] and info["lora_fused"] is True
    assert info["distilled"]["steps"] == 10 and info["params"] < info["teacher_params"]


def test_resume_continues_exactly(setup, tmp_path):
    cfg_full = config(setup, tmp_path / "full", max_steps=4)
    full = method(cfg_full, preset="half")
    Trainer(cfg_full, full, progress_bar=False).train()

    cfg = config(setup, tmp_path / "split", max_steps=4, checkpoint_every=2)
    first = method(cfg, preset="half")

    def stop_at_2(progress):
        if progress.step == 2:
            raise TrainingCancelled("test stop")

    out = Trainer(cfg, first, callback=stop_at_2, progress_bar=False).train()
    assert out.interrupted and out.step == 2
    assert not os.path.exists(tmp_path / "split" / "transformer")  # nothing exported from an interrupted run
    cfg2 = config(setup, tmp_path / "split", max_steps=4, checkpoint_every=2, resume="latest")
    second = method(cfg2, preset="half")
    done = Trainer(cfg2, second, progress_bar=False).train()
    assert done.step == 4 and not done.interrupted
    a, b = full.state_dict(), second.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = method(config(setup, tmp_path / "q"), preset="quarter")
    other.load(torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="different student"):
        other.load_state_dict(a)


def test_pruned_student_round_trips_through_save_load_and_the_pipeline(setup, tmp_path):
    from dsd_core.distill.student import count_params, save_student, student_info
    from dsd_core.loading import load_pipeline
    from dsd_core.tiny import reference_image

    teacher = load_teacher(os.path.join(setup["model"], "transformer"),
                           os.path.join(setup["model"], "pytorch_lora_weights.safetensors"))
    layout = StudentLayout.for_teacher(teacher, "half")
    student = build_student(teacher, layout)
    folder = tmp_path / "model" / "transformer"
    save_student(student, str(folder), student_info(student, layout, count_params(teacher), lora_fused=True),
                 single_file=str(tmp_path / "student.safetensors"))
    call = dict(height=PANEL, width=2 * PANEL, num_inference_steps=2, seed=3, output_type="pt")
    ref = reference_image(64, 64, seed=1)
    # a model folder holding only the student loads without a LoRA (it is fused into the student)
    pipe = load_pipeline(base=setup["base"], model=str(tmp_path / "model"), dtype="float32", device="cpu",
                         local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_layers == len(layout.double)
    got = pipe(ref, "a photo of the cat", **call).images
    # the same student object dropped into a pipeline gives the same pixels
    from dsd_core.pipeline import DSDPipeline

    direct = DSDPipeline(**{**pipe.components, "transformer": student})
    direct.set_progress_bar_config(disable=True)
    assert torch.equal(direct(ref, "a photo of the cat", **call).images, got)
    # the single-file route reads the reduced layer counts from the tensors
    from dsd_core.single_file.transformer import load_dsd_transformer_file

    single = load_dsd_transformer_file(str(tmp_path / "student.safetensors"), dtype=torch.float32)
    assert (single.config.num_layers, single.config.num_single_layers) == (len(layout.double), len(layout.single))
    assert all(torch.equal(single.state_dict()[k], v) for k, v in student.state_dict().items())
    # GGUF (a memory mode for small devices): the student quantized to Q8_0 loads with its reduced layer counts
    from dsd_core.memory.gguf import load_gguf_transformer, save_gguf

    save_gguf(student.state_dict(), str(tmp_path / "student-Q8_0.gguf"), "Q8_0")
    quant = load_gguf_transformer(str(tmp_path / "student-Q8_0.gguf"), dtype=torch.float32)
    assert (quant.config.num_layers, quant.config.num_single_layers) == (len(layout.double), len(layout.single))
    # the full-keep student of the fused teacher generates the teacher's image (fused-LoRA pipeline)
    full = build_student(teacher, StudentLayout.for_teacher(teacher, "full"))
    teacher_pipe = load_pipeline(base=setup["base"], model=setup["model"], dtype="float32", device="cpu",
                                 local_files_only=True, memory=MemoryConfig(fuse_lora=True))
    teacher_pipe.set_progress_bar_config(disable=True)
    same = DSDPipeline(**{**teacher_pipe.components, "transformer": full})
    same.set_progress_bar_config(disable=True)
    assert torch.allclose(same(ref, "a photo of the cat", **call).images,
                          teacher_pipe(ref, "a photo of the cat", **call).images, atol=1e-6)


def test_on_device_chain_through_the_cli(setup, tmp_path, capsys):
    """teacher -> teacher-painted pairs -> pruned student (importance) -> distil (YAML) -> fp8 storage + DSD LoRA
    personalisation of the student (the `train` command) -> generate; Custom Diffusion on the student (tune a concept,
    generate with it); and the evaluation report."""
    from PIL import Image

    from dsd_core.cli import main
    from dsd_core.tiny import reference_image

    refs = tmp_path / "refs"
    refs.mkdir()
    for k in range(2):
        reference_image(64, 64, seed=40 + k).save(refs / f"ref{k}.png")
    (tmp_path / "prompts.txt").write_text("a photo of the cat\nthe dog on a red chair\n")
    common = ["--base", setup["base"], "--local-files-only", "--panel-size", str(PANEL)]
    pairs = tmp_path / "pairs"
    assert main(["distill", "data", "--model", setup["model"], "--references", str(refs), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(pairs), "--steps", "2", "--quiet", *common]) == 0
    assert len(load_pairs(str(pairs))) == 2
    student = tmp_path / "student"
    assert main(["distill", "prune", "--model", setup["model"], "--preset", "half", "--selection", "importance",
                 "--data", str(pairs), "--out", str(student), *common]) == 0
    info = read_student_info(str(student))
    assert len(info["kept_double"]) == 2 and len(info["importance"]["single"]) == 4
    assert "parameters:" in capsys.readouterr().out
    yaml = tmp_path / "distill.yaml"
    yaml.write_text(f"data: {pairs}\nbase: {setup['base']}\nmodel: {setup['model']}\noutput: {tmp_path / 'out'}\n"
                    f"student: {student}\npanel_size: {PANEL}\nmin_image_size: 16\nmax_steps: 3\ncpu: true\n"
                    "checkpoint_every: 0\nvalidate_every: 0\nlocal_files_only: true\nmax_sequence_length: 16\n"
                    "lr: 0.0005\nguidance_min: 2.0\nguidance_max: 5.0\n")
    assert main(["distill", "train", "--config", str(yaml), "--quiet"]) == 0
    distilled = tmp_path / "out"
    assert read_student_info(str(distilled / "transformer"))["kept_double"] == info["kept_double"]

    # personalise on the device: DSD LoRA training of the student with fp8 transformer weights (the 16gb preset)
    assert main(["train", "--method", "dsd-lora", "--data", setup["data"], "--from-flux",
                 str(distilled / "transformer"), "--output", str(tmp_path / "personal"), "--memory", "16gb",
                 "--max-steps", "2", "--cpu", "--checkpoint-every", "0", "--validate-every", "0", "--rank", "2",
                 "--alpha", "2", "--max-sequence-length", "16", "--min-image-size", "16", "--quiet", *common]) == 0
    out_png = tmp_path / "gen.png"
    assert main(["generate", "--image", str(refs / "ref0.png"), "--prompt", "the cat on a beach", "--out",
                 str(out_png), "--base", setup["base"], "--model", str(tmp_path / "personal"), "--memory", "16gb",
                 "--steps", "2", "--height", str(PANEL), "--width", str(2 * PANEL), "--seed", "1", "--offline",
                 "--quiet"]) == 0
    assert Image.open(out_png).size == (PANEL, PANEL)
    # the student itself stored as int8 (torchao), as a device with little memory would load it
    assert main(["generate", "--image", str(refs / "ref0.png"), "--prompt", "the cat on a beach", "--out",
                 str(tmp_path / "int8.png"), "--base", setup["base"], "--model", str(distilled),
                 "--transformer-weights", "int8", "--steps", "1", "--height", str(PANEL), "--width", str(2 * PANEL),
                 "--seed", "1", "--offline", "--quiet"]) == 0

    # Custom Diffusion on the student, unchanged: tune a concept into the distilled model, generate with it
    import yaml

    concept_dir = tmp_path / "concept"
    concept_dir.mkdir()
    for k in range(2):
        reference_image(64, 64, seed=60 + k).save(concept_dir / f"c{k}.png")
    cd = dict(mode="dsd", base=setup["base"], model=str(distilled), output=str(tmp_path / "cd"),
              instance_dir=str(concept_dir), instance_prompt="photo of a <new1> cat", cpu=True, max_steps=1,
              min_image_size=16, panel_size=PANEL, num_class_images=1, class_steps=1, rank=2, max_sequence_length=16,
              local_files_only=True, gradient_checkpointing=False)
    (tmp_path / "cd.yaml").write_text(yaml.safe_dump(cd))
    assert main(["custom-diffusion", "train", "--config", str(tmp_path / "cd.yaml")]) == 0
    cd_png = tmp_path / "cd.png"
    assert main(["custom-diffusion", "generate", "--concept", str(tmp_path / "cd" / "concept.safetensors"),
                 "--prompt", "this <new1> cat on a beach", "--image", str(refs / "ref0.png"), "--out", str(cd_png),
                 "--size", str(PANEL), "--steps", "1", "--mode", "dsd", "--base", setup["base"], "--model",
                 str(distilled), "--dtype", "float32", "--device", "cpu", "--offline"]) == 0
    assert Image.open(cd_png).size == (PANEL, PANEL)

    report_dir = tmp_path / "report"
    assert main(["distill", "eval", "--model", setup["model"], "--student", str(distilled / "transformer"),
                 "--data", setup["held_out"], "--out", str(report_dir), "--steps", "2", "--repeats", "1", *common]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["params"] < report["teacher_params"] and report["speed"]["ratio"] > 0
    assert report["full_size"]["double"] == 10 and report["psnr"] > 0
    assert Image.open(report_dir / "grid.png").size == (3 * PANEL, 2 * PANEL)
    assert "PSNR vs teacher" in capsys.readouterr().out
