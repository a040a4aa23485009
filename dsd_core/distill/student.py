"""Building a pruned DSD student from a teacher, and saving it as an ordinary DSD transformer.

The student is a :class:`dsd_core.DSDTransformer2DModel` with ``num_layers`` / ``num_single_layers`` reduced to the
kept blocks. Every non-block weight (embedders, ``c_embedder``, ``norm_out``, ``proj_out``) and every kept block is
copied from the teacher (BK-SDM / Flux-Mini initialisation), so a student keeping all blocks *is* the teacher.

Saved, it is a normal DSD transformer folder (``config.json`` + safetensors) that loads wherever a DSD transformer
loads (``--transformer``, the loader nodes, :func:`dsd_core.loading.load_pipeline`, the memory modes); next to it,
``student.json`` records the kept teacher blocks, the parameter counts and where the teacher came from. The optional
single file (:func:`save_student_file`) carries the same record in its safetensors header (``dsd_student``) and loads
through the single-file route, which reads the layer counts from the tensors.

The DSD LoRA is part of the teacher: fuse it into the teacher's weights before pruning (:func:`load_teacher` does;
block indices change, so the LoRA file cannot be applied to the student afterwards). Generate with the student and
no LoRA (CLI: ``--transformer STUDENT --no-lora``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import torch

from ..errors import InputError, ModelFormatError, ModelNotFoundError
from .layout import DOUBLE, SINGLE, StudentLayout

logger = logging.getLogger(__name__)

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name; one file (a student is at most ~12 GB)
METADATA_KEY = "dsd_student"
FORMAT = "dsd-student"


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_teacher(teacher) -> None:
    if not hasattr(teacher, "c_embedder"):
        raise InputError(f"the teacher is a {type(teacher).__name__} without c_embedder; load it as a "
                         "dsd_core.DSDTransformer2DModel (init_condition_embedder=True for plain FLUX).")
    if getattr(teacher, "peft_config", None):
        raise InputError("the teacher still has LoRA adapters loaded; fuse them into its weights first "
                         "(dsd_core.memory.apply.fuse_lora(pipe) or load_teacher(..., lora=FILE)).")
    odd = {str(p.dtype) for p in teacher.parameters() if not p.dtype.is_floating_point or p.element_size() < 2}
    if odd:
        raise InputError(f"the teacher holds {', '.join(sorted(odd))} weights; build the student from native "
                         "(bf16/fp16/fp32) weights and apply fp8/int8/GGUF to the student afterwards.")


def student_config(teacher_config, layout: StudentLayout) -> dict:
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    config["num_layers"], config["num_single_layers"] = len(layout.double), len(layout.single)
    return config


def student_state_dict(teacher_state: dict, layout: StudentLayout) -> dict:
    """The teacher's tensors under the student's names: kept blocks renumbered, dropped blocks left out."""
    key_map = layout.state_key_map()
    out = {}
    for name, tensor in teacher_state.items():
        if name.startswith((DOUBLE + ".", SINGLE + ".")):
            kind, index, rest = name.split(".", 2)
            new = key_map.get(f"{kind}.{index}.")
            if new is None:
                continue
            name = new + rest
        out[name] = tensor
    return out


@torch.no_grad()
def build_student(teacher, layout: StudentLayout):
    """A new student transformer with ``layout``'s blocks copied from ``teacher`` (same dtype and device)."""
    from ..transformer import DSDTransformer2DModel

    _check_teacher(teacher)
    cfg = teacher.config
    if (cfg.num_layers, cfg.num_single_layers) != (layout.teacher_double, layout.teacher_single):
        raise InputError(f"the layout was made for a teacher with {layout.teacher_double}+{layout.teacher_single} "
                         f"blocks, but this teacher has {cfg.num_layers}+{cfg.num_single_layers}.")
    with torch.device("meta"):
        student = DSDTransformer2DModel.from_config(student_config(cfg, layout))
    state = {k: v.detach().clone() for k, v in student_state_dict(teacher.state_dict(), layout).items()}
    student.load_state_dict(state, strict=True, assign=True)
    student.eval()
    student.requires_grad_(False)
    return student


def student_info(student, layout: StudentLayout, teacher_params: int | None = None, **extra) -> dict:
    """The record saved with a student: format, kept blocks, parameter counts, provenance."""
    info = {"format": FORMAT, "version": 1, **layout.to_dict(), "params": count_params(student)}
    if teacher_params is not None:
        info["teacher_params"] = int(teacher_params)
        info["param_ratio"] = round(info["params"] / teacher_params, 4)
    info.update({k: v for k, v in extra.items() if v is not None})
    return info


def save_student(student, folder: str, info: dict, single_file: str | None = None, replace: bool = False,
                 dtype: torch.dtype | None = None) -> str:
    """Write ``student`` as a DSD transformer folder (+ ``student.json``), atomically; optionally one safetensors file.

    ``folder`` must not exist or be empty unless ``replace`` (a previous student is never half overwritten).
    ``dtype`` stores the weights in that dtype (e.g. bfloat16 for a float32-trained student).
    """
    from ..training.io import atomic_save_file, atomic_write_text, replace_dir

    folder = os.path.abspath(os.path.expanduser(folder))
    if not replace and os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder for the student.")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".student-")
    try:
        student.save_config(tmp)
        atomic_save_file(_stored_state(student, dtype), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_text(os.path.join(tmp, STUDENT_FILE), json.dumps(info, indent=2, sort_keys=True))
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if single_file:
        save_student_file(student, single_file, info, dtype)
    return folder


def _stored_state(student, dtype: torch.dtype | None) -> dict:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in student.state_dict().items()}


def save_student_file(student, path: str, info: dict, dtype: torch.dtype | None = None) -> str:
    """The student as one safetensors file (diffusers keys) with ``info`` in the header, written atomically."""
    from ..training.io import atomic_save_file

    path = os.path.abspath(os.path.expanduser(path))
    atomic_save_file(_stored_state(student, dtype), path,
                     metadata={"format": "pt", METADATA_KEY: json.dumps(info, sort_keys=True)})
    return path


def read_student_info(path: str) -> dict | None:
    """The student record of a student folder or single file; ``None`` for a transformer that is not a student."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        file = os.path.join(path, STUDENT_FILE)
        if not os.path.isfile(file):
            return None
        with open(file, encoding="utf-8") as f:
            info = json.load(f)
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw is None:
            return None
        info = json.loads(raw)
    else:
        raise ModelNotFoundError(f"{path} is neither a transformer folder nor a .safetensors file.")
    if info.get("format") != FORMAT:
        raise ModelFormatError(f"{path} has a student record of unknown format {info.get('format')!r}.")
    return info


def load_student(path: str, dtype: torch.dtype = torch.float32):
    """A saved student (folder or single file) as a :class:`DSDTransformer2DModel`, with its record."""
    from ..transformer import DSDTransformer2DModel

    info = read_student_info(path)
    if os.path.isdir(path):
        model = DSDTransformer2DModel.from_pretrained(path, dtype=dtype)
    else:
        from ..single_file import load_dsd_transformer_file

        model = load_dsd_transformer_file(path, dtype=dtype)
    return model, info


def load_teacher(transformer: str, lora: str | None = None, dtype: torch.dtype = torch.float32):
    """The DSD teacher transformer from its folder, with the DSD ``lora`` (a .safetensors file) fused in."""
    from ..transformer import DSDTransformer2DModel

    if not os.path.isdir(os.path.expanduser(transformer)):
        raise ModelNotFoundError(f"teacher transformer folder {transformer} does not exist; pass the DSD "
                                 "transformer/ folder (config.json + safetensors).")
    model = DSDTransformer2DModel.from_pretrained(os.path.expanduser(transformer), dtype=dtype)
    if lora:
        fuse_lora_file(model, lora)
    model.eval()
    model.requires_grad_(False)
    return model


def fuse_lora_file(transformer, lora: str) -> None:
    """Merge a diffusers/PEFT LoRA file into ``transformer``'s weights and remove the adapter layers."""
    from diffusers import FluxPipeline

    from ..loading import resolve_lora

    lora = resolve_lora(lora, None)
    state, alphas, metadata = FluxPipeline.lora_state_dict(lora, return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                            adapter_name="teacher", metadata=metadata)
    transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()
