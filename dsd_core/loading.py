"""Finding, downloading and loading the DSD model set.

A DSD model set has three parts:

* the **base**: FLUX.1-dev's VAE, CLIP-L and T5-XXL text encoders with their tokenizers, and the scheduler config, as
  a diffusers folder (``model_index.json`` + subfolders) or a Hugging Face repo id. The base *transformer* is never
  needed and never downloaded (it saves ~24 GB);
* the **DSD transformer**: ``transformer/`` (``config.json`` + safetensors) of ``primecai/dsd_model``;
* the **DSD LoRA**: ``pytorch_lora_weights.safetensors`` of ``primecai/dsd_model``, applied unfused.

Downloads go through ``huggingface_hub`` (its progress bars, cache and the user's token: ``HF_TOKEN`` or
``hf auth login``). Without network, a missing file is reported with the fix, in one line.
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import DSDError, ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
DEFAULT_MODEL = "primecai/dsd_model"
LORA_FILENAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_DIR = "transformer"
#: The base components DSD uses (no base transformer).
BASE_COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
BASE_PATTERNS = ["model_index.json"] + [f"{c}/*" for c in BASE_COMPONENTS]
MODEL_PATTERNS = [f"{TRANSFORMER_DIR}/*", LORA_FILENAME]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _looks_like_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)


def download(repo_id: str, allow_patterns: list[str], what: str, token: str | None = None,
             local_files_only: bool = False, cache_dir: str | None = None, local_dir: str | None = None,
             tqdm_class=None) -> str:
    """``snapshot_download`` with errors turned into one-line causes and fixes.

    ``tqdm_class`` replaces huggingface_hub's progress bar (e.g. to feed an application's progress display).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        extra = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
        return snapshot_download(repo_id, allow_patterns=allow_patterns, token=token, cache_dir=cache_dir,
                                 local_dir=local_dir, local_files_only=local_files_only, **extra)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} ({what}) is gated: accept its licence on huggingface.co/{repo_id} and log in "
            "(`hf auth login` or HF_TOKEN), or point at a local copy."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelNotFoundError(
            f"{repo_id} ({what}) was not found on the Hugging Face Hub (or is private: log in with `hf auth login` "
            "or HF_TOKEN); check the name or point at a local folder."
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        offline = isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or local_files_only
        cause = "it is not in the local cache and downloads are off" if offline else f"the download failed ({type(e).__name__})"
        raise ModelNotFoundError(
            f"cannot get {what} from {repo_id}: {cause}. Download it on a machine with internet "
            f"(`hf download {repo_id}`) or point at a local folder."
        ) from None


def resolve_base(base: str, token: str | None = None, local_files_only: bool = False) -> str:
    """Local diffusers folder of the FLUX.1-dev base (downloading the needed components if given a repo id)."""
    base = os.path.expanduser(os.fspath(base))
    if _looks_like_repo_id(base):
        base = download(base, BASE_PATTERNS, "the FLUX.1-dev base components", token, local_files_only)
    if not os.path.isdir(base):
        raise ModelNotFoundError(
            f"base {base} does not exist; pass a diffusers FLUX.1-dev folder (with model_index.json) or a Hugging "
            f"Face repo id such as {DEFAULT_BASE}."
        )
    missing = [c for c in BASE_COMPONENTS if not os.path.isdir(os.path.join(base, c))]
    if not os.path.isfile(os.path.join(base, "model_index.json")) or missing:
        what = "model_index.json" if not os.path.isfile(os.path.join(base, "model_index.json")) else ", ".join(missing)
        raise ModelFormatError(
            f"{base} is not a diffusers FLUX.1-dev folder (missing {what}); point --base at a folder with "
            "model_index.json, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/."
        )
    return base


def resolve_model(model: str | None = DEFAULT_MODEL, transformer: str | None = None, lora: str | bool | None = None,
                  token: str | None = None, local_files_only: bool = False) -> tuple[str, str | None]:
    """(transformer folder, LoRA file or None) from a model folder/repo id and optional explicit overrides.

    ``lora=False`` loads no LoRA (for comparisons and training); ``None`` takes the model folder's LoRA.
    """
    folder = None
    if model is not None and (transformer is None or lora is None):
        model = os.path.expanduser(os.fspath(model))
        folder = download(model, MODEL_PATTERNS, "the DSD weights", token, local_files_only) \
            if _looks_like_repo_id(model) else model
        if not os.path.isdir(folder):
            raise ModelNotFoundError(
                f"DSD model folder {folder} does not exist; pass a folder holding transformer/ and {LORA_FILENAME}, or "
                f"the repo id {DEFAULT_MODEL}."
            )
    if transformer is None:
        if folder is None:
            raise ModelNotFoundError("no DSD transformer given; pass model= (a folder or repo id) or transformer=.")
        transformer = os.path.join(folder, TRANSFORMER_DIR)
        if not os.path.isdir(transformer):
            raise ModelNotFoundError(
                f"{folder} has no transformer/ folder; a DSD model folder holds transformer/ (config.json + "
                f"safetensors) and {LORA_FILENAME}, as in {DEFAULT_MODEL}."
            )
    transformer = os.path.expanduser(os.fspath(transformer))
    if not os.path.isdir(transformer):
        raise ModelNotFoundError(f"DSD transformer folder {transformer} does not exist; pass the transformer/ folder.")
    return transformer, resolve_lora(lora, folder)


def resolve_lora(lora: str | bool | None, folder: str | None) -> str | None:
    """The LoRA file: ``False`` none, ``None``/``True`` the one in the model ``folder``, else the given file (or a
    folder holding ``pytorch_lora_weights.safetensors``). Only safetensors are accepted."""
    if lora is False:
        return None
    if lora is None or lora is True:
        if folder is None:
            raise ModelNotFoundError(f"no DSD LoRA given; pass lora= (a {LORA_FILENAME} file) or model=.")
        lora = os.path.join(folder, LORA_FILENAME)
        if not os.path.isfile(lora):
            raise ModelNotFoundError(
                f"{folder} has no {LORA_FILENAME}; download it from {DEFAULT_MODEL} or pass --lora FILE."
            )
    lora = os.path.expanduser(os.fspath(lora))
    if os.path.isdir(lora):
        lora = os.path.join(lora, LORA_FILENAME)
    if not os.path.isfile(lora):
        raise ModelNotFoundError(f"LoRA file {lora} does not exist; pass the path of {LORA_FILENAME}.")
    if not lora.endswith(".safetensors"):
        raise ModelFormatError(f"{lora} is not a .safetensors file; only safetensors are loaded (never pickle).")
    return lora


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` -> bfloat16 on accelerators (the reference), float32 on CPU (bf16 on CPU is slow)."""
    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DSDError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_pipeline(
    base: str = DEFAULT_BASE,
    model: str | None = DEFAULT_MODEL,
    transformer: str | None = None,
    lora: str | bool | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    offload: str = "none",
    token: str | None = None,
    local_files_only: bool = False,
    init_condition_embedder: bool = False,
    memory=None,
    speed=None,
):
    """Build a ready :class:`~dsd_core.DSDPipeline` from a base, a DSD transformer and the DSD LoRA.

    Args:
        base: FLUX.1-dev diffusers folder or repo id (only VAE, text encoders, tokenizers, scheduler are used).
        model: folder or repo id holding ``transformer/`` and ``pytorch_lora_weights.safetensors``.
        transformer, lora: explicit overrides of the model folder's parts (``lora=False``: no LoRA).
        dtype: ``bfloat16`` / ``float16`` / ``float32`` (default: bf16 on GPU, fp32 on CPU).
        device: ``cuda`` / ``mps`` / ``cpu`` (default: the best available).
        offload: ``none`` (all on device), ``model`` (one component at a time on the GPU), ``group`` (block by
            block) or ``sequential`` (layer by layer; least memory, slowest). Shorthand for ``memory``'s offload.
        token: Hugging Face token (default: the user's login / ``HF_TOKEN``).
        local_files_only: never download; missing files are an error that says what to fetch.
        init_condition_embedder: accept a plain FLUX transformer and start ``c_embedder`` at zero (training).
        memory: a memory preset (``full``, ``24gb``, ``16gb``, ``12gb``, ``8gb``, ``lowest``), a
            :class:`dsd_core.memory.MemoryConfig` or a dict of its switches (weight storage fp8/int8/int4/nf4/gguf,
            offload incl. ``group``, LoRA fusing, text-encoder release); default: no savings, ``offload`` applies.
        speed: ``exact`` (default), ``fast``, a :class:`dsd_core.speed.SpeedConfig` or a dict of its switches
            (torch.compile, attention backend, First Block Cache, true-guidance window).
    """
    from .memory.apply import apply_memory, check_available, load_transformer, resolve_gguf_parts
    from .memory.config import resolve_memory
    from .pipeline import DSDPipeline
    from .speed import apply_speed, resolve_speed
    from .validation import check_load_arguments, check_model_files

    check_load_arguments(base, model, transformer, lora, dtype, device)
    memory = resolve_memory(memory, offload)
    speed = resolve_speed(speed)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    check_available(memory, device)  # before any download
    if memory.transformer_weights == "gguf":  # the GGUF file replaces the transformer/ folder
        transformer_dir, lora_file = resolve_gguf_parts(model, transformer, lora, token, local_files_only)
    else:
        transformer_dir, lora_file = resolve_model(model, transformer, lora, token, local_files_only)
    base_dir = resolve_base(base, token, local_files_only)
    check_model_files(None if memory.transformer_weights == "gguf" else transformer_dir, lora_file, base_dir,
                      init_condition_embedder)  # headers vs configs, before any weights load

    dit = load_transformer(memory, transformer_dir, torch_dtype, device, init_condition_embedder)
    try:
        pipe = DSDPipeline.from_pretrained(base_dir, transformer=dit, dtype=torch_dtype, local_files_only=True,
                                           use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"could not load the FLUX base from {base_dir}: {e}") from e
    if lora_file is not None:
        pipe.load_dsd_lora(lora_file)
    apply_memory(pipe, memory, device)  # LoRA fusing, fp8 casting, offload or placement on the device
    apply_speed(pipe, speed)
    return pipe
