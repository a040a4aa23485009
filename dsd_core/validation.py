"""Checks that run before any weights load: numbers, output paths, devices, canvas memory, and model files.

Everything that can be decided from the arguments, from file headers and from configs is decided here, so a bad
input costs milliseconds instead of a 34 GB load followed by a traceback. Each check raises one
:mod:`dsd_core.errors` type whose message names the problem and the fix.

* :func:`check_generation` -- the generation arguments of :meth:`dsd_core.DSDPipeline.__call__` (finite, in range,
  integral where required, the right types); the CLI calls it with its flag names (:func:`check_generate_args`);
* :func:`check_output_path` -- the output files can be written (folder writable, not a folder, ``.png``, disk space);
* :func:`check_device` -- the device exists (CUDA/MPS available);
* :func:`check_canvas_memory` -- a lower bound of the VAE's working memory for the canvas against free memory;
* :func:`check_model_files` -- a DSD model set on disk: transformer keys/shapes vs its ``config.json`` and the LoRA's
  keys/shapes vs the transformer (both from safetensors headers, nothing loaded), base components present as
  safetensors (never pickles), tokenizer folders not empty;
* :func:`check_lora_file` -- a LoRA's header against a transformer config.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import numbers
import os
import re
import shutil
import tempfile
from typing import Iterable, Mapping

from .errors import InputError, ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

#: API argument name -> CLI flag, so the same check speaks the caller's language.
CLI_FLAGS = {
    "prompt": "--prompt", "height": "--height", "width": "--width", "num_inference_steps": "--steps",
    "guidance_scale": "--guidance", "image_guidance_scale": "--image-guidance",
    "text_guidance_scale": "--text-guidance", "true_guidance_start_step": "--true-guidance-start",
    "seed": "--seed", "num_images_per_prompt": "--num-images", "lora_scale": "--lora-scale",
}
MAX_STEPS = 1000
MAX_IMAGES = 64
#: Formats the CLI writes (PNG only: lossless, and the settings travel in its text chunk).
OUTPUT_EXTENSIONS = (".png",)


# ---------------------------------------------------------------------------------------------- numbers
def number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
           integer: bool = False, allow_none: bool = False):
    """``value`` as an int/float after checking it is a finite number in ``[minimum, maximum]`` (and integral)."""
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # 0-d tensors and numpy scalars
            import torch

            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not isinstance(
            value, numbers.Integral)):
        raise InputError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    value = float(value) if not isinstance(value, numbers.Integral) else int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}; NaN or infinity would turn the whole "
                         "image into NaN (a black picture). Pass a normal value.")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}.")
    return value


def check_generation(*, prompt=None, height=512, width=1024, num_inference_steps=28, guidance_scale=3.5,
                     image_guidance_scale=1.0, text_guidance_scale=1.0, true_guidance_start_step=2,
                     true_guidance_end_step=None, seed=None, num_images_per_prompt=1, lora_scale=None,
                     negative_prompt="", names: Mapping[str, str] | None = None) -> None:
    """Check the generation arguments (types, finiteness, ranges, integrality, canvas size); ``names`` maps the
    argument names to the caller's (e.g. CLI flags) for the messages."""
    from .canvas import check_canvas_size

    def n(key: str) -> str:
        return (names or {}).get(key, key)

    for key, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InputError(f"{n(key)} must be a string, got {type(text).__name__}; pass the text to generate from "
                             "(it may be empty).")
    height = number(n("height"), height, minimum=1, integer=True)
    width = number(n("width"), width, minimum=1, integer=True)
    check_canvas_size(height, width)
    number(n("num_inference_steps"), num_inference_steps, minimum=1, maximum=MAX_STEPS, integer=True)
    number(n("guidance_scale"), guidance_scale, minimum=0)
    number(n("image_guidance_scale"), image_guidance_scale, minimum=0)
    number(n("text_guidance_scale"), text_guidance_scale, minimum=0)
    start = number(n("true_guidance_start_step"), true_guidance_start_step, minimum=0, integer=True)
    number(n("true_guidance_end_step"), true_guidance_end_step, minimum=start, integer=True, allow_none=True)
    count = number(n("num_images_per_prompt"), num_images_per_prompt, minimum=1, maximum=MAX_IMAGES, integer=True)
    number(n("lora_scale"), lora_scale, allow_none=True)
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise InputError(f"got {len(seed)} seeds for {count} images; pass one seed per image or a single int.")
        for s in seed:
            number(n("seed"), s, integer=True)
    else:
        number(n("seed"), seed, integer=True, allow_none=True)


def check_reference(image) -> None:
    """The reference is a PIL image or a tensor, and a tensor holds finite values (NaN in the reference gives a
    normal-looking but wrong image)."""
    import PIL.Image
    import torch

    if not isinstance(image, (PIL.Image.Image, torch.Tensor)):
        raise InputError(f"image must be a PIL image or a tensor, got {type(image).__name__}; load a file with "
                         "dsd_core.load_image(path).")
    if isinstance(image, torch.Tensor) and image.numel() and not bool(torch.isfinite(image).all()):
        raise InputError("the reference image tensor contains NaN or infinite values; pass a valid image (values "
                         "in [-1, 1] for a tensor reference).")


# ---------------------------------------------------------------------------------------------- output files
def check_output_path(out: str, paths: Iterable[str] = (), expected_bytes: int = 0, flag: str = "--out") -> None:
    """The output can be written: not a folder, a ``.png`` name, its folder writable, room on the disk.

    ``paths`` are all files the run will write (default: ``out``); ``expected_bytes`` their estimated total size.
    """
    out = os.fspath(out)
    if out.endswith((os.sep, "/")) or os.path.isdir(out):
        raise InputError(f"{flag} {out} is a folder; pass a file name in it, e.g. {os.path.join(out, 'dsd.png')}.")
    ext = os.path.splitext(out)[1].lower()
    if ext and ext not in OUTPUT_EXTENSIONS:
        raise InputError(f"{flag} {out}: images are saved as PNG (lossless, with the settings in the file); name "
                         f"the output .png, e.g. {os.path.splitext(out)[0]}.png.")
    for path in list(paths) or [out]:
        if os.path.isdir(path):
            raise InputError(f"cannot write {path}: a folder of that name exists; pass another {flag}.")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise InputError(f"cannot write {path}: the file exists and is read-only; pass another {flag}.")
    folder = os.path.dirname(os.path.abspath(out))
    existing = folder
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing or (os.path.exists(existing) and not os.path.isdir(existing)):
            raise InputError(f"cannot write {out}: {existing} is not a folder; pass another {flag}.")
        existing = parent
    try:  # the only reliable test: create (and remove) a file there; read-only mounts and ACLs included
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".dsd-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write {out}: {existing} is not writable ({os.strerror(e.errno or errno.EACCES)});"
                         f" pass an {flag} in a writable folder.") from None
    free = shutil.disk_usage(existing).free
    if expected_bytes and free < expected_bytes:
        raise InputError(f"cannot write {out}: {existing} has {_size(free)} free but the images need about "
                         f"{_size(expected_bytes)}; free some space or pass an {flag} on another disk.")


#: Prefix of the temporary files images are written to before the atomic rename (with the writer's process id).
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------- model names
def check_model_name(name, what: str = "model name") -> str:
    """A model name from a workflow (a folder or file name relative to a model folder), refused if it could leave
    that folder: absolute paths, ``..`` components, drive letters, NUL bytes. Returns the normalised name."""
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{what} must be a non-empty name from the model list, got {name!r}.")
    norm = os.path.normpath(name.replace("\\", "/"))
    parts = norm.replace("\\", "/").split("/")
    if "\x00" in name or re.match(r"^[A-Za-z]:", norm) or os.path.isabs(norm) or os.path.splitdrive(norm)[0] or ".." in parts or norm.startswith("/"):
        raise InputError(f"{what} {name!r} points outside its model folder; pick a name from the list (model "
                         "names are relative to ComfyUI's model folders and may not contain '..' or start with '/').")
    return norm


# ---------------------------------------------------------------------------------------------- device and memory
def check_device(device) -> None:
    """The device exists on this machine (one line instead of torch's AssertionError deep in the load)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu.") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} was asked for but CUDA is not available here (no NVIDIA GPU, or "
                             "a CPU-only PyTorch); use --device cpu / device='cpu', or install a CUDA PyTorch.")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise InputError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s), numbered from 0.")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"device {device!r} was asked for but Apple MPS is not available here; use cpu.")


def available_memory(device) -> int | None:
    """Free bytes on ``device`` (CUDA: free VRAM; CPU/MPS: available RAM), or None if unknown."""
    import torch

    kind = torch.device(device or "cpu").type
    if kind == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def canvas_memory(height: int, width: int, num_images: int = 1, vae_channels: Iterable[int] = (128, 256),
                  bytes_per_value: int = 2) -> int:
    """A lower bound of the VAE decoder's working memory for ``num_images`` canvases of ``height x width``.

    The last up block of the decoder holds the 2x-upsampled features (``channels[1]``) and its output
    (``channels[0]``), about three live tensors of each at full resolution for the whole batch (measured on the tiny
    model: ~200 bytes per canvas pixel in float32 against 192 from this formula).
    """
    c = list(vae_channels) + [0, 0]
    return int(num_images) * int(height) * int(width) * bytes_per_value * 3 * (c[0] + c[1])


def check_canvas_memory(height: int, width: int, num_images: int = 1, device=None, dtype=None,
                        vae_config: Mapping | str | None = None) -> None:
    """Refuse a canvas whose VAE working memory alone exceeds the free memory of ``device`` (before loading).

    ``vae_config``: the VAE config (dict, or a folder/``config.json``) for its channel widths; default full size.
    """
    import torch

    channels = (128, 256)
    if isinstance(vae_config, (str, os.PathLike)):
        path = os.path.join(vae_config, "config.json") if os.path.isdir(vae_config) else os.fspath(vae_config)
        try:
            with open(path, encoding="utf-8") as f:
                vae_config = json.load(f)
        except (OSError, ValueError):
            vae_config = None
    if isinstance(vae_config, Mapping) and vae_config.get("block_out_channels"):
        channels = tuple(vae_config["block_out_channels"][:2])
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    device = device or "cpu"
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    need = canvas_memory(height, width, num_images, channels, torch.empty((), dtype=dtype).element_size())
    free = available_memory(device)
    if free is not None and need > free:
        images = f" x {num_images} images" if num_images > 1 else ""
        raise InputError(
            f"a {width}x{height} canvas{images} needs at least {_size(need)} for the VAE alone, but only "
            f"{_size(free)} of {torch.device(device).type} memory is free. Use a smaller canvas (DSD was trained at "
            "512x1024), fewer images per run, or a machine with more memory."
        )


# ---------------------------------------------------------------------------------------------- model files
def safetensors_files(folder: str, what: str, fix: str) -> list[str]:
    """The ``.safetensors`` weight files of a component folder; pickles (``.bin``/``.pt``/``.ckpt``) are refused
    with how to convert them."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ModelFormatError(f"{folder} is a file, but {what} must be a folder; {fix}.")
        raise ModelNotFoundError(f"{what} folder {folder} does not exist; {fix}.")
    names = sorted(os.listdir(folder))
    files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if files:
        return files
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise ModelFormatError(
            f"{folder} holds only pickle weights ({pickles[0]}); only safetensors are loaded, never pickle (it can run "
            "code). Convert once on a trusted machine: `python -c \"import sys, torch; from safetensors.torch import "
            "save_file; save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])\" IN.bin OUT.safetensors` "
            f"(or load the component with from_pretrained and save_pretrained(safe_serialization=True)), or {fix}."
        )
    raise ModelNotFoundError(f"{folder} holds no .safetensors weights for {what}; {fix}.")


def header_state(files: list[str], what: str, fix: str) -> dict:
    """Meta tensors (names and shapes, no data) of one or several safetensors files; damaged files are one line."""
    from .single_file.checkpoint import Checkpoint

    state = {}
    for path in files:
        with Checkpoint(path, what, fix) as ckpt:
            state.update(ckpt.meta_state())
    return state


def _read_json(path: str, what: str, fix: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} ({what}) does not exist; {fix}.") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} ({what}) is not valid JSON ({e}); {fix}.") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} ({what}) is not a JSON object; {fix}.")
    return data


def _empty_model(factory, path: str, what: str, fix: str):
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return factory()
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise ModelFormatError(f"{path} is not a valid {what} config ({type(e).__name__}: {e}); {fix}.") from None


def transformer_config(transformer_dir: str) -> dict:
    fix = "download the transformer/ folder of primecai/dsd_model again"
    return _read_json(os.path.join(transformer_dir, "config.json"), "the DSD transformer config", fix)


def check_transformer_folder(transformer_dir: str, init_condition_embedder: bool = False) -> dict:
    """The transformer folder's safetensors headers against its ``config.json`` (keys and shapes); its config."""
    from .single_file.checkpoint import check_against_model
    from .transformer import DSDTransformer2DModel

    from .transformer import read_transformer_link

    fix = "download the transformer/ folder of primecai/dsd_model again"
    config = transformer_config(transformer_dir)
    files = safetensors_files(transformer_dir, "the DSD transformer", fix)
    link = read_transformer_link(transformer_dir)  # a trained model: its c_embedder + the base transformer's weights
    if link is not None:
        files = safetensors_files(link["base_transformer"], "the linked base transformer",
                                  "restore the base transformer the model was trained from") + files
    state = header_state(files, "DSD transformer", fix)
    if "c_embedder.weight" not in state:
        if not init_condition_embedder:
            raise ModelFormatError(
                f"{transformer_dir} holds a plain FLUX transformer (no c_embedder weights), not a DSD transformer. "
                "Use the transformer/ folder of primecai/dsd_model (to start training DSD from FLUX, the Python API "
                "takes init_condition_embedder=True)."
            )
    model = _empty_model(lambda: DSDTransformer2DModel.from_config(config), transformer_dir, "DSD transformer", fix)
    if init_condition_embedder and "c_embedder.weight" not in state:
        expected = model.state_dict()
        state.update({k: v for k, v in expected.items() if k.startswith("c_embedder.")})
    check_against_model(state, model, transformer_dir, "DSD transformer matching its config.json",
                        f"the weights and config.json do not belong together: {fix}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


#: LoRA tensor name suffixes (diffusers/PEFT and older diffusers names) -> which side of the layer they are.
_LORA_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight")
_LORA_UP = (".lora_B.weight", ".lora.up.weight", ".lora_up.weight")


def _lora_target(name: str) -> tuple[str, str] | None:
    for side, suffixes in (("down", _LORA_DOWN), ("up", _LORA_UP)):
        for s in suffixes:
            if name.endswith(s):
                return name[: -len(s)], side
    return None


def check_lora_file(path: str, transformer_config: Mapping) -> None:
    """A LoRA's safetensors header against a transformer config: readable, holds LoRA weights, and every layer it
    targets exists in the transformer with matching input/output sizes. Nothing is loaded.

    Layers in diffusers/PEFT naming (``transformer.<module>.lora_A.weight``) are checked one by one; other layouts
    (kohya, BFL) are converted by diffusers at load time and only checked for being a LoRA.
    """
    from .single_file.checkpoint import Checkpoint, describe_keys

    fix = "pass the DSD LoRA (pytorch_lora_weights.safetensors of primecai/dsd_model) or a LoRA trained for DSD"
    path = os.fspath(path)
    with Checkpoint(path, "DSD LoRA", fix) as ckpt:
        names = {n: ckpt.shape(n) for n in ckpt.names}
    if not any("lora" in n.lower() for n in names):
        kind = describe_keys(names)
        raise ModelFormatError(f"{path} holds no LoRA weights (no tensor name contains 'lora')"
                               f"{f'; it looks like {kind}' if kind else ''}; {fix}.")
    layers: dict[str, dict[str, tuple]] = {}
    for name, shape in names.items():
        if name.startswith(("text_encoder.", "text_encoder_2.")):
            continue
        target = _lora_target(name)
        if target is None:
            continue
        module, side = target
        module = module.removeprefix("transformer.").removeprefix("base_model.model.")
        layers.setdefault(module, {})[side] = tuple(shape)
    if not layers:
        return  # another naming (kohya/BFL): diffusers converts it; its errors are translated at load time
    linears = _linear_layers(json.dumps(_plain_config(transformer_config), sort_keys=True, default=str), path, fix)
    unknown = sorted(m for m in layers if m not in linears)
    if unknown:
        raise ModelFormatError(
            f"{path} does not fit this DSD transformer: {len(unknown)} of its {len(layers)} LoRA layers target "
            f"modules the transformer does not have (e.g. {unknown[0]}); it is a LoRA for another model. {fix[0].upper() + fix[1:]}."
        )
    for module, sides in sorted(layers.items()):
        in_features, out_features = linears[module]
        down, up = sides.get("down"), sides.get("up")
        problem = None
        if down is None or up is None:
            problem = f"has only the {'up' if down is None else 'down'} half of the layer"
        elif len(down) != 2 or len(up) != 2 or down[1] != in_features or up[0] != out_features or down[0] != up[1]:
            problem = (f"has shapes down {down} / up {up}, but the transformer's layer maps {in_features} -> "
                       f"{out_features}")
        if problem:
            raise ModelFormatError(f"{path} does not fit this DSD transformer: LoRA layer {module} {problem}; the "
                                   f"LoRA was made for a model of another size or is damaged. {fix[0].upper() + fix[1:]}.")


def _plain_config(config: Mapping) -> dict:
    """A transformer config without bookkeeping (``_class_name``, ...) and load-time options (quantization)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "quantization_config"}


@functools.lru_cache(maxsize=4)
def _linear_layers(config_json: str, path: str, fix: str) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of the transformer a config describes (built empty, cached)."""
    import torch

    from .transformer import DSDTransformer2DModel

    config = json.loads(config_json)
    model = _empty_model(lambda: DSDTransformer2DModel.from_config(config), path, "DSD transformer", fix)
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


#: (component folder, what) of the base components loaded from safetensors.
_WEIGHTED = (("vae", "the FLUX VAE"), ("text_encoder", "the CLIP-L text encoder"),
             ("text_encoder_2", "the T5-XXL text encoder"))
#: tokenizer folder -> file sets of which one must be complete.
_TOKENIZER_FILES = {"tokenizer": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                    "tokenizer_2": (("tokenizer.json",), ("spiece.model",))}


def check_base_folder(base_dir: str) -> None:
    """A FLUX.1-dev base folder: VAE and text encoders as valid safetensors (never pickles), the VAE's weights
    matching its config, tokenizer folders holding a tokenizer."""
    from diffusers import AutoencoderKL

    from .single_file.checkpoint import check_against_model

    fix = "download the FLUX.1-dev base components again (`hf download black-forest-labs/FLUX.1-dev`)"
    for sub, what in _WEIGHTED:
        folder = os.path.join(base_dir, sub)
        files = safetensors_files(folder, what, fix)
        state = header_state(files, what, fix)
        if sub == "vae":
            path = os.path.join(folder, "config.json")
            config = _read_json(path, "the VAE config", fix)
            model = _empty_model(lambda: AutoencoderKL.from_config(config), path, "VAE", fix)
            check_against_model(state, model, folder, "VAE matching its config.json",
                                f"the weights and config.json do not belong together: {fix}")
        else:
            _read_json(os.path.join(folder, "config.json"), f"the config of {what}", fix)
    for sub, choices in _TOKENIZER_FILES.items():
        folder = os.path.join(base_dir, sub)
        if not any(all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) > 0
                       for f in files) for files in choices):
            need = " or ".join(" + ".join(files) for files in choices)
            raise ModelFormatError(f"{folder} holds no usable tokenizer (needs {need}); {fix}.")


def check_model_files(transformer_dir: str | None, lora_file: str | None, base_dir: str | None,
                      init_condition_embedder: bool = False) -> None:
    """Everything :func:`dsd_core.loading.load_pipeline` will read, checked from headers and configs first.

    ``transformer_dir`` None skips the transformer (e.g. a GGUF file replaces it); the LoRA is then only checked for
    being a readable LoRA against the folder's config if there is one.
    """
    config = None
    if transformer_dir is not None:
        config = check_transformer_folder(transformer_dir, init_condition_embedder)
    if base_dir is not None:
        check_base_folder(base_dir)
    if lora_file is not None:
        if config is None:
            from .single_file.checkpoint import Checkpoint

            with Checkpoint(lora_file, "DSD LoRA", "the DSD LoRA (pytorch_lora_weights.safetensors)"):
                pass
        else:
            check_lora_file(lora_file, config)


def check_lora_for_transformer_file(lora_file: str, transformer_file: str) -> None:
    """The LoRA against the config implied by a single transformer file's header (see :mod:`dsd_core.single_file`)."""
    from .single_file.checkpoint import Checkpoint
    from .single_file.transformer import HINT, WHAT, plan_names, to_diffusers
    from .single_file.transformer import transformer_config as derive

    with Checkpoint(transformer_file, WHAT, HINT) as ckpt:
        state = ckpt.meta_state()
        layout, mapping = plan_names(list(state), ckpt.path, ckpt.wrong_file)
    checked = to_diffusers({rel: state[name] for name, rel in mapping.items()}, layout, transformer_file)
    check_lora_file(lora_file, derive(checked, None, transformer_file))


# ---------------------------------------------------------------------------------------------- the CLI
def check_generate_args(args) -> None:
    """All argument-level checks of ``python -m dsd_core generate`` (before the image is read or anything loads)."""
    check_generation(prompt=args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, image_guidance_scale=args.image_guidance,
                     text_guidance_scale=args.text_guidance, true_guidance_start_step=args.true_guidance_start,
                     seed=args.seed, num_images_per_prompt=args.num_images, lora_scale=args.lora_scale,
                     names=CLI_FLAGS)
    check_device(args.device)
    image = os.path.expanduser(args.image)
    if os.path.isdir(image):
        raise InputError(f"--image {args.image} is a folder; pass one image file (PNG/JPEG/WebP).")
    if not os.path.isfile(image):
        raise InputError(f"--image {args.image} does not exist; pass the path of a PNG/JPEG/WebP file.")
    extras = 1 + bool(getattr(args, "save_panel", False)) * 2 + bool(getattr(args, "save_reference", False))
    paths = []
    stem, ext = os.path.splitext(args.out)
    for k in range(args.num_images):
        paths.append(f"{stem}{'' if k == 0 else f'_{k}'}{ext or '.png'}")
    check_output_path(args.out, paths, expected_bytes=args.num_images * extras * args.height * args.width // 2 * 3)
    for flag in ("transformer", "lora", "transformer_file", "clip_l", "t5xxl", "vae_file", "gguf"):
        value = getattr(args, flag, None)
        if value and not os.path.exists(os.path.expanduser(value)):
            raise ModelNotFoundError(f"--{flag.replace('_', '-')} {value} does not exist; check the path.")
    for flag in ("transformer_file", "clip_l", "t5xxl", "vae_file"):
        value = getattr(args, flag, None)
        if value and os.path.isdir(os.path.expanduser(value)):
            raise ModelFormatError(f"--{flag.replace('_', '-')} {value} is a folder; pass the .safetensors file.")
    vae_config = None
    base = os.path.expanduser(args.base or "")
    if base and os.path.isdir(os.path.join(base, "vae")):
        vae_config = os.path.join(base, "vae")
    elif base and os.path.isfile(base):
        raise ModelFormatError(f"--base {args.base} is a file; pass a diffusers FLUX.1-dev folder (with "
                               "model_index.json) or a Hugging Face repo id.")
    model = os.path.expanduser(args.model or "")
    if model and os.path.isfile(model) and not args.transformer:
        raise ModelFormatError(f"--model {args.model} is a file; pass a folder holding transformer/ and "
                               "pytorch_lora_weights.safetensors, or a Hugging Face repo id.")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # MPS shares the RAM: as CPU
    check_canvas_memory(args.height, args.width, args.num_images, device, args.dtype, vae_config)


def check_load_arguments(base=None, model=None, transformer=None, lora=None, device=None) -> None:
    """Argument-level checks of a folder source (:class:`dsd_core.sources.FolderSource`): types, the device, and
    local paths of the wrong kind (a file where a folder is needed says so instead of "does not exist")."""
    check_device(device)
    for name, value in (("base", base), ("model", model), ("transformer", transformer)):
        if value is None or value is False:
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(f"{name} must be a path or repo id, got {type(value).__name__}.")
        path = os.path.expanduser(os.fspath(value))
        if os.path.isfile(path):
            raise ModelFormatError(f"{name} {path} is a file, but a folder is needed; pass the folder that holds it "
                                   f"({os.path.dirname(path) or '.'}?).")
    if lora not in (None, True, False) and not isinstance(lora, (str, os.PathLike)):
        raise InputError(f"lora must be a path, True/None (the model's LoRA) or False, got {type(lora).__name__}.")


__all__ = [
    "CLI_FLAGS", "available_memory", "canvas_memory", "check_base_folder", "check_canvas_memory", "check_device",
    "check_generate_args", "check_generation", "check_load_arguments", "check_lora_file",
    "check_lora_for_transformer_file", "check_model_files", "check_model_name", "check_output_path", "check_reference",
    "check_transformer_folder", "number", "safetensors_files",
]
