"""GGUF quants of the DSD transformer: loading (diffusers ``GGUFQuantizationConfig``) and writing (``gguf`` package).

Community GGUF files of DSD (e.g. made with city96's ComfyUI-GGUF tools) hold the transformer with ``c_embedder``, in
BFL/ComfyUI key layout (``double_blocks.N...``) or in diffusers layout (``transformer_blocks.N...``), optionally under
a prefix. The names are mapped with :mod:`dsd_core.single_file.transformer` (the same code as the safetensors single
files; it splits fused q|k|v rows, which works on GGUF's byte rows because GGUF quantizes along the input dimension),
then diffusers builds the model with ``GGUFLinear`` layers that dequantize on the fly (CUDA kernels when available,
plain torch otherwise, so it also runs on the CPU). ``c_embedder`` must be in the file; a plain FLUX GGUF is refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Mapping

import numpy as np
import torch

from ..errors import DSDError, ModelFormatError, ModelNotFoundError

logger = logging.getLogger(__name__)

#: Types this module can write (the ``gguf`` package quantizes these in numpy; K-quants it can only read).
WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise DSDError("GGUF transformers need the gguf package: `pip install gguf` (or pick the '12gb' preset, fp8, "
                       "which needs nothing extra).") from None


def _logical_shape(t: torch.Tensor) -> tuple:
    return tuple(getattr(t, "quant_shape", None) or t.shape)


def load_gguf_transformer(path: str, *, dtype: torch.dtype, config=None):
    """Load a DSD transformer from a GGUF file; layers stay quantized and are dequantized to ``dtype`` when used.

    Args:
        path: the ``.gguf`` file (diffusers or BFL/ComfyUI layout, ``c_embedder`` included).
        dtype: compute dtype.
        config: optional config overrides (dict, ``config.json`` or its folder); by default the config is derived from
            the tensor shapes.
    """
    require_gguf()
    from diffusers import GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    from ..single_file.configs import read_config
    from ..single_file.transformer import derive_config, plan_names, to_diffusers
    from ..transformer import DSDTransformer2DModel

    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file {path} does not exist; pass the DSD transformer's .gguf file.")
    if not path.endswith(".gguf"):
        raise ModelFormatError(f"{path} is not a .gguf file; transformer_weights='gguf' loads GGUF quants only.")
    try:
        state = load_gguf_checkpoint(path, return_tensors=True)
    except ValueError as e:  # unsupported quant type
        raise ModelFormatError(f"{path}: {str(e).splitlines()[0]}") from None
    layout, mapping = plan_names(list(state), path)
    state = to_diffusers({rel: state[name] for name, rel in mapping.items()}, layout, path)
    try:
        cfg = derive_config({k: _logical_shape(v) for k, v in state.items()})
    except ModelFormatError as e:
        raise ModelFormatError(f"{path} is not a complete FLUX transformer ({e}).") from None
    cfg.update(read_config(config))
    with tempfile.TemporaryDirectory(prefix="dsd-gguf-config-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"_class_name": "DSDTransformer2DModel", **cfg}, f)
        model = DSDTransformer2DModel.from_single_file(
            state, config=tmp, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), dtype=dtype,
            local_files_only=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelFormatError(f"{path} is missing {len(missing)} weights of the DSD transformer (e.g. {missing[0]}).")
    # GGUFLinear replaced x_embedder; DSDTransformer2DModel re-attaches the c_embedder hook on its next forward
    quantized = sorted({str(p.quant_type.name) for p in model.parameters() if hasattr(p, "quant_type")})
    logger.info("loaded the DSD transformer from %s (%s layout, %s)", path, layout, ", ".join(quantized) or "float")
    return model


def save_gguf(state: Mapping[str, torch.Tensor], path: str, quant: str = "Q8_0", arch: str = "flux") -> str:
    """Write a transformer state dict to ``path`` as GGUF, names unchanged.

    2-D weights whose input size is a multiple of the block size are quantized to ``quant`` (one of
    :data:`WRITABLE_TYPES`); other 2-D weights are stored F16 and 1-D tensors (biases, norms) F32, as community
    quantizers do. For tests and small models; the ``gguf`` package quantizes in numpy, so it is slow for 12 B weights.
    """
    require_gguf()
    import gguf

    if quant not in WRITABLE_TYPES:
        raise DSDError(f"cannot write GGUF type {quant!r}; use one of {', '.join(WRITABLE_TYPES)}.")
    qtype = gguf.GGMLQuantizationType[quant]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path, arch=arch)
    try:
        for name in sorted(state):
            arr = state[name].detach().to("cpu", torch.float32).numpy()
            if arr.ndim != 2:
                writer.add_tensor(name, arr.astype(np.float32))
            elif quant == "F32":
                writer.add_tensor(name, arr)
            elif quant == "F16" or arr.shape[-1] % block:
                writer.add_tensor(name, arr.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
