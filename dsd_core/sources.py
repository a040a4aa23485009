"""Where the parts of a DSD pipeline come from. A source only finds and loads files; the order of assembly (load ->
LoRA -> fuse -> fp8 -> offload -> speed) is :func:`dsd_core.assembly.build_pipeline`'s.

* :class:`FolderSource` -- a FLUX.1-dev diffusers folder (or Hugging Face repo id) for the VAE, text encoders,
  tokenizers and scheduler, and a DSD model folder (or ``primecai/dsd_model``) holding ``transformer/`` and
  ``pytorch_lora_weights.safetensors``. The base transformer is never needed and never downloaded (~24 GB saved).
* :class:`FilesSource` -- the single files ComfyUI users have (DSD transformer, ``clip_l``, ``t5xxl``, ``ae``, LoRA),
  offline; see :mod:`dsd_core.single_file`.

A source resolves to local files with :meth:`resolve` (downloading what is missing; every problem reported at once)
and returns its :class:`Parts`: ``load_components(dtype)`` (everything but the transformer) and
``load_transformer(dtype, quantization_config)``. The only thing a source asks the memory config is whether it
brings its own transformer weights (``MemoryConfig.transformer_file``, a GGUF quant): then the source's
transformer weights are neither required nor downloaded, only its ``config.json`` when there is one.

Downloads go through ``huggingface_hub`` (its progress bars, cache and the user's token: ``HF_TOKEN`` or
``hf auth login``). A failed download says why (downloads turned off, not cached, no network, gated, not found) and
gives the smallest ``hf download ... --include ...`` command that fixes it.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from typing import Callable

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
#: What a GGUF transformer still needs from the DSD model repo.
MODEL_PATTERNS_NO_WEIGHTS = [LORA_FILENAME, f"{TRANSFORMER_DIR}/config.json"]
BASE_WHAT = "the FLUX.1-dev base components"
MODEL_WHAT = "the DSD weights"


# ---------------------------------------------------------------------------------------------- downloads
class DownloadError(ModelNotFoundError):
    """A hub download that failed; carries what was asked so several can be reported as one message."""

    def __init__(self, repo_id: str, patterns: list[str], what: str, cause: str, fixable: bool = True):
        self.repo_id, self.patterns, self.what, self.cause, self.fixable = repo_id, list(patterns), what, cause, fixable
        super().__init__(self.render([self]))

    @property
    def command(self) -> str:
        """The smallest ``hf download`` that fetches exactly what is needed."""
        include = " ".join(f"--include {shlex.quote(p)}" for p in self.patterns)
        return f"hf download {self.repo_id} {include}"

    @staticmethod
    def render(errors: list["DownloadError"]) -> str:
        parts = " and ".join(f"{e.what} from {e.repo_id}" for e in errors)
        causes = list(dict.fromkeys(e.cause for e in errors))
        cause = causes[0] if len(causes) == 1 else "; ".join(f"{e.repo_id}: {e.cause}" for e in errors)
        fixable = [e for e in errors if e.fixable]
        fix = ""
        if fixable:
            commands = " && ".join(f"`{e.command}`" for e in fixable)
            fix = (f" Fix: {commands} (on a machine with internet if this one has none), or point at a local folder "
                   "instead.")
        return f"cannot get {parts}: {cause}.{fix}"


def _explain(error: Exception, repo_id: str, local_files_only: bool) -> tuple[str, bool]:
    """(why a download failed, whether `hf download` fixes it) from huggingface_hub's exception."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    incomplete = _hub_error("IncompleteSnapshotError")
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 8:
            break
    if isinstance(error, GatedRepoError):
        return (f"it is gated: accept its licence on huggingface.co/{repo_id} and log in (`hf auth login` or "
                "HF_TOKEN)"), True
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return ("it was not found on the Hugging Face Hub (or is private: log in with `hf auth login` or HF_TOKEN); "
                "check the name"), False
    if incomplete is not None and isinstance(error, incomplete):
        return "its cached copy is incomplete and the Hub cannot be reached to finish it", True
    if local_files_only:
        return "it is not in the local Hugging Face cache and downloads are off (--offline / local_files_only)", True
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain) or constants.HF_HUB_OFFLINE:
        return "it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1)", True
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain
                   if isinstance(e, HfHubHTTPError)), None)
    if status is not None:
        return f"the Hugging Face Hub answered HTTP {status}; try again later", True
    if any(type(e).__name__ in ("ConnectError", "ConnectTimeout", "TimeoutException", "ReadTimeout",
                                "ConnectionError", "LocalEntryNotFoundError") for e in chain):
        return "it is not in the local Hugging Face cache and the Hub cannot be reached (no network?)", True
    return f"the download failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:160]})", True


def _hub_error(name: str):
    import huggingface_hub.errors as errors

    return getattr(errors, name, None)


def download(repo_id: str, allow_patterns: list[str], what: str, token: str | None = None,
             local_files_only: bool = False, cache_dir: str | None = None, local_dir: str | None = None,
             tqdm_class=None) -> str:
    """``snapshot_download`` of ``allow_patterns`` only; a failure is a :class:`DownloadError` saying why and how
    to fix it. ``tqdm_class`` replaces huggingface_hub's progress bar (e.g. to feed an application's display)."""
    from huggingface_hub import snapshot_download

    try:
        extra = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
        return snapshot_download(repo_id, allow_patterns=allow_patterns, token=token, cache_dir=cache_dir,
                                 local_dir=local_dir, local_files_only=bool(local_files_only), **extra)
    except OSError as e:  # huggingface_hub's errors are OSErrors
        cause, fixable = _explain(e, repo_id, bool(local_files_only))
        raise DownloadError(repo_id, allow_patterns, what, cause, fixable) from None
    except ValueError as e:  # e.g. a malformed repo id
        raise ModelNotFoundError(f"cannot get {what} from {repo_id}: {str(e).splitlines()[0]}") from None


def raise_all(problems: list[DSDError]) -> None:
    """Raise nothing, the one problem, or one error listing every problem (downloads merged into one fix)."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    downloads = [p for p in problems if isinstance(p, DownloadError)]
    others = [str(p).rstrip(".") + "." for p in problems if not isinstance(p, DownloadError)]
    text = " ".join(([DownloadError.render(downloads)] if downloads else []) + others)
    kind = ModelFormatError if all(isinstance(p, ModelFormatError) for p in problems) else ModelNotFoundError
    raise kind(f"{len(problems)} problems: {text}")


def looks_like_repo_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)


# ---------------------------------------------------------------------------------------------- folders
def resolve_base(base: str, token: str | None = None, local_files_only: bool = False) -> str:
    """Local diffusers folder of the FLUX.1-dev base (downloading the needed components if given a repo id)."""
    base = os.path.expanduser(os.fspath(base))
    if looks_like_repo_id(base):
        base = download(base, BASE_PATTERNS, BASE_WHAT, token, local_files_only)
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
                  token: str | None = None, local_files_only: bool = False,
                  weights: bool = True) -> tuple[str | None, str | None]:
    """(transformer folder, LoRA file or None) from a model folder/repo id and optional explicit overrides.

    ``lora=False`` loads no LoRA (for comparisons and training); ``None`` takes the model folder's LoRA.
    ``weights=False`` (the memory config brings its own transformer weights, a GGUF file): the transformer folder is
    optional and only supplies ``config.json`` (``None`` without one); from a repo id only the LoRA and
    ``transformer/config.json`` are fetched.
    """
    folder = None
    if model is not None and (transformer is None or lora is None or lora is True):
        model = os.path.expanduser(os.fspath(model))
        patterns = MODEL_PATTERNS if weights else MODEL_PATTERNS_NO_WEIGHTS
        folder = download(model, patterns, MODEL_WHAT, token, local_files_only) if looks_like_repo_id(model) else model
        if not os.path.isdir(folder):
            raise ModelNotFoundError(
                f"DSD model folder {folder} does not exist; pass a folder holding transformer/ and {LORA_FILENAME}, or "
                f"the repo id {DEFAULT_MODEL}."
            )
    if not weights:
        config_dir = transformer or (os.path.join(folder, TRANSFORMER_DIR) if folder else None)
        if config_dir is not None and not os.path.isfile(os.path.join(os.fspath(config_dir), "config.json")):
            config_dir = None
        return config_dir, resolve_lora(lora, folder)
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
    if lora is None and folder is not None and not os.path.isfile(os.path.join(folder, LORA_FILENAME)) \
            and lora_is_fused(transformer):
        lora = False  # a distilled student carries the DSD LoRA in its weights (dsd_core.distill)
    return transformer, resolve_lora(lora, folder)


def lora_is_fused(transformer_dir: str) -> bool:
    """Whether the transformer folder says the DSD LoRA is already merged into it (a distilled student's
    ``student.json`` with ``lora_fused``)."""
    import json

    path = os.path.join(transformer_dir, "student.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return bool(json.load(f).get("lora_fused"))
    except (OSError, ValueError):
        return False


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


# ---------------------------------------------------------------------------------------------- parts
@dataclass
class Parts:
    """A source resolved to local files, ready to load.

    transformer_config: the transformer's config (folder, file or dict; ``None``: derived from the weights), used
        when the memory config brings its own transformer weights (a GGUF file).
    lora: the LoRA file, or None.
    components: ``(dtype) -> dict`` of everything but the transformer.
    transformer: ``(dtype, quantization_config) -> model`` from the source's weights; None if it has none.
    fit: ``(transformer, components) -> None``, raises if the parts do not fit together.
    """

    transformer_config: object
    lora: str | None
    components: Callable
    transformer: Callable | None
    fit: Callable | None = None

    def load_components(self, dtype) -> dict:
        """``dict(text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae, scheduler)`` in ``dtype``."""
        return self.components(dtype)

    def load_transformer(self, dtype, quantization_config=None):
        """The DSD transformer from the source's weights, quantized while loading if a config is given."""
        if self.transformer is None:
            raise DSDError("this source resolved without transformer weights; the memory config must bring them.")
        return self.transformer(dtype, quantization_config)

    def check(self, transformer, components: dict) -> None:
        """Raise if the parts do not fit together (e.g. a text encoder of the wrong width)."""
        if self.fit is not None:
            self.fit(transformer, components)


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class FolderSource:
    """A FLUX.1-dev base folder/repo id and a DSD model folder/repo id (see the module docstring).

    transformer, lora: explicit overrides of the model folder's parts (``lora=False``: no LoRA; a file path).
    token: Hugging Face token (default: the user's login / ``HF_TOKEN``); never shown in reprs or logs.
    local_files_only: never download; missing files are an error that says what to fetch.
    init_condition_embedder: accept a plain FLUX transformer and start ``c_embedder`` at zero (training).
    """

    base: str = DEFAULT_BASE
    model: str | None = DEFAULT_MODEL
    transformer: str | None = None
    lora: str | bool | None = None
    token: str | None = field(default=None, repr=False, compare=False)
    local_files_only: bool = False
    init_condition_embedder: bool = False

    @classmethod
    def from_kwargs(cls, base=None, model=None, **kwargs) -> "FolderSource":
        """Like the constructor, with ``None`` meaning the default base / model (``load_pipeline``'s arguments)."""
        return cls(base=DEFAULT_BASE if base is None else base, model=DEFAULT_MODEL if model is None else model,
                   **kwargs)

    def memory(self, memory):
        """The memory config this source loads with (checked against what the source can do)."""
        if self.init_condition_embedder and memory.transformer_weights not in ("native", "fp8"):
            raise DSDError("init_condition_embedder (training from plain FLUX) works with native or fp8 weights only.")
        return memory

    def resolve(self, memory) -> Parts:
        """Find (or download) the base and the DSD model; every problem is reported at once."""
        from .validation import check_load_arguments, check_model_files

        check_load_arguments(self.base, self.model, self.transformer, self.lora)
        weights = memory.transformer_file is None
        problems: list[DSDError] = []
        transformer_dir = lora = base_dir = None
        try:
            transformer_dir, lora = resolve_model(self.model, self.transformer, self.lora, self.token,
                                                  self.local_files_only, weights=weights)
        except DSDError as e:
            problems.append(e)
        try:
            base_dir = resolve_base(self.base, self.token, self.local_files_only)
        except DSDError as e:
            problems.append(e)
        raise_all(problems)
        check_model_files(transformer_dir if weights else None, lora, base_dir,
                          self.init_condition_embedder)  # headers vs configs, before any weights load
        return Parts(transformer_config=transformer_dir, lora=lora,
                     components=lambda dtype: _base_components(base_dir, dtype),
                     transformer=(lambda dtype, qc: _folder_transformer(transformer_dir, dtype, qc,
                                                                         self.init_condition_embedder))
                     if weights else None)


def _base_components(base_dir: str, dtype) -> dict:
    from diffusers import FluxPipeline

    try:
        pipe = FluxPipeline.from_pretrained(base_dir, transformer=None, dtype=dtype, local_files_only=True,
                                            use_safetensors=True)  # never a pickle (.bin) fallback
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"could not load the FLUX base from {base_dir}: {e}") from e
    return {k: v for k, v in pipe.components.items() if k not in ("transformer", "image_encoder", "feature_extractor")}


def _folder_transformer(transformer_dir: str, dtype, quantization_config, init_condition_embedder: bool):
    from .transformer import DSDTransformer2DModel

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return DSDTransformer2DModel.from_pretrained(transformer_dir, dtype=dtype,
                                                 init_condition_embedder=init_condition_embedder, **extra)


@dataclass(frozen=True)
class FilesSource:
    """DSD from single files, offline (see :mod:`dsd_core.single_file`).

    transformer: the DSD transformer as one safetensors file (diffusers or BFL/ComfyUI layout, bf16 or fp8), or a
        GGUF quant of it (``.gguf``: loaded as ``MemoryConfig(transformer_weights="gguf")``).
    clip_l, t5xxl, vae: ``clip_l.safetensors``, ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn(_scaled)``, ``ae.safetensors``.
    lora: the DSD LoRA (``.safetensors``), or None for none.
    tokenizers, comfy_root, search_tokenizers: where the tokenizers come from
        (:func:`dsd_core.single_file.tokenizers.resolve_tokenizer_dirs`).
    configs: overrides ``{"clip"|"t5"|"vae": dict or config.json}``; transformer_config: overrides of the
        transformer config derived from its shapes.
    """

    transformer: str
    clip_l: str
    t5xxl: str
    vae: str
    lora: str | None = None
    tokenizers: object = None
    comfy_root: str | None = None
    configs: dict | None = None
    transformer_config: object = None
    search_tokenizers: bool = True

    @property
    def is_gguf(self) -> bool:
        return str(self.transformer).lower().endswith(".gguf")

    def memory(self, memory):
        """The memory config this source loads with: a ``.gguf`` transformer file sets GGUF weights; formats made
        while loading a diffusers folder (int8, int4, nf4) are refused."""
        if self.is_gguf and memory.transformer_weights not in ("native", "gguf"):
            raise DSDError(f"{self.transformer} is a GGUF quant; it cannot also be stored as "
                           f"{memory.transformer_weights}. Pick a memory setting with native weights.")
        if memory.quantizes_on_load:
            raise DSDError(f"{memory.transformer_weights} weights are made while loading a transformer folder; with "
                           "single files use fp8, a GGUF quant, or a folder source (dsd_core.load_pipeline).")
        if self.is_gguf:
            return memory.replace(transformer_weights="gguf", gguf_file=os.fspath(self.transformer))
        return memory

    def resolve(self, memory) -> Parts:
        """Check every file before anything is read (one-line errors that name the file and the fix)."""
        from .single_file import TRANSFORMER_HINT, TRANSFORMER_WHAT, check_file, check_fit

        transformer = None if memory.transformer_file is not None else check_file(
            self.transformer, TRANSFORMER_WHAT, TRANSFORMER_HINT)
        lora = None if self.lora is None else check_file(self.lora, "DSD LoRA",
                                                         "the DSD LoRA (pytorch_lora_weights.safetensors)")
        if lora is not None and transformer is not None:  # the LoRA's header against the transformer file's
            from .validation import check_lora_for_transformer_file

            check_lora_for_transformer_file(lora, transformer)
        return Parts(transformer_config=self.transformer_config, lora=lora, components=self._components,
                     transformer=(lambda dtype, qc: _file_transformer(transformer, dtype, self.transformer_config))
                     if transformer is not None else None,
                     fit=lambda dit, components: check_fit(dit, components, self.transformer, self.clip_l, self.t5xxl))

    def _components(self, dtype) -> dict:
        from .single_file import load_components_from_files

        return load_components_from_files(self.clip_l, self.t5xxl, self.vae, dtype=dtype,
                                          tokenizer_dirs=self.tokenizers, comfy_root=self.comfy_root,
                                          configs=self.configs, search_tokenizers=self.search_tokenizers)


def _file_transformer(path: str, dtype, config):
    from .single_file import load_dsd_transformer_file

    return load_dsd_transformer_file(path, dtype=dtype, config=config)


@dataclass(frozen=True)
class FluxBaseSource:
    """Plain FLUX.1-dev text-to-image from a diffusers folder or repo id: the base's *own* transformer, no
    ``c_embedder``, no LoRA (data generation draws its grids with it, :mod:`dsd_core.datagen`). Unlike
    :class:`FolderSource` it needs and downloads the base ``transformer/`` (~24 GB at full size)."""

    base: str = DEFAULT_BASE
    token: str | None = field(default=None, repr=False, compare=False)
    local_files_only: bool = False

    def memory(self, memory):
        """GGUF quants are of the DSD transformer, not of FLUX; releasing the text encoders makes no sense when every
        grid has a new prompt (switched off with a warning)."""
        if memory.transformer_file is not None:
            raise DSDError("transformer_weights='gguf' loads a DSD transformer; for plain FLUX pick native, fp8, int8, "
                           "int4 or nf4 (e.g. the '12gb' preset).")
        if memory.release_text_encoders:
            logger.warning("release_text_encoders is off for plain FLUX: every grid has a new prompt to encode.")
            memory = memory.replace(release_text_encoders=False)
        return memory

    def resolve(self, memory) -> Parts:
        base = os.path.expanduser(os.fspath(self.base))
        if looks_like_repo_id(base):
            base = download(base, BASE_PATTERNS + [f"{TRANSFORMER_DIR}/*"], BASE_WHAT + " with the FLUX transformer",
                            self.token, self.local_files_only)
        base_dir = resolve_base(base, self.token, self.local_files_only)
        transformer_dir = os.path.join(base_dir, TRANSFORMER_DIR)
        if not os.path.isdir(transformer_dir):
            raise ModelFormatError(f"{base_dir} has no transformer/ folder; plain FLUX generation needs the base's own "
                                   f"transformer (hf download {DEFAULT_BASE} --include 'transformer/*').")
        return Parts(transformer_config=transformer_dir, lora=None,
                     components=lambda dtype: _base_components(base_dir, dtype),
                     transformer=lambda dtype, qc: _flux_transformer(transformer_dir, dtype, qc))


def _flux_transformer(transformer_dir: str, dtype, quantization_config):
    from diffusers import FluxTransformer2DModel

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        return FluxTransformer2DModel.from_pretrained(transformer_dir, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"could not load the FLUX transformer from {transformer_dir}: {e}") from e
