"""The FLUX VAE from ``ae.safetensors`` (BFL layout, as ComfyUI users keep it) or a diffusers-layout VAE file.

BFL names (``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight`` as 1x1 convs, ``decoder.up.N``
in reverse order, no ``quant_conv``) are converted with diffusers' own ``convert_ldm_vae_checkpoint``. The config is
the shipped ``flux_vae.json`` when the shapes are those of the FLUX VAE, otherwise derived from the shapes (channels,
blocks, layers per block; norm groups = 32, or the largest power of two up to half the narrowest block for tiny
models); scaling and shift factors are FLUX's.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from ..errors import ModelFormatError
from .checkpoint import Checkpoint, find_prefix, instantiate
from .configs import read_config, shipped_config

logger = logging.getLogger(__name__)

WHAT = "FLUX VAE"
HINT = "ae.safetensors, the FLUX autoencoder (ComfyUI: models/vae)"
ANCHOR = "encoder.conv_in.weight"
BFL_ANCHOR = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_ANCHOR = "encoder.down_blocks.0.resnets.0.conv1.weight"
SIZE_KEYS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
             "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
FLUX_LATENT_CHANNELS = 16


def _count(names, prefix: str) -> int:
    found = {int(n[len(prefix):].split(".", 1)[0]) for n in names if n.startswith(prefix)}
    return max(found) + 1 if found else 0


def vae_names(names: list[str], source: str, wrong_file=None) -> tuple[str, dict[str, str]]:
    """(layout, {file name: name without prefix}) for a VAE file."""
    prefix = find_prefix(names, ANCHOR)
    names_set = set(names)
    if prefix is None or prefix + "decoder.conv_out.weight" not in names_set:
        if wrong_file is not None:
            raise wrong_file(ANCHOR)
        raise ModelFormatError(f"{source} is not a VAE (no {ANCHOR}); pass {HINT}.")
    if prefix + BFL_ANCHOR in names_set:
        layout = "bfl"
    elif prefix + DIFFUSERS_ANCHOR in names_set:
        layout = "diffusers"
    else:
        raise ModelFormatError(f"{source} is a VAE of an unknown layout (neither {BFL_ANCHOR} nor {DIFFUSERS_ANCHOR}); "
                               f"pass {HINT}.")
    mapping = {n: n[len(prefix):] for n in names if n.startswith(prefix)}
    if len(mapping) < len(names):
        logger.info("%s: ignoring %d tensors outside %r", source, len(names) - len(mapping), prefix)
    return layout, mapping


def bfl_vae_to_diffusers(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """BFL/LDM VAE names -> diffusers, with diffusers' converter; error naming ``source`` for unconverted tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    blocks = _count(state, "encoder.down.")
    layout = {"down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks}
    # which tensors the converter uses, found on fresh meta tensors (distinct objects, no shared storage)
    probe = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    names = {id(v): k for k, v in probe.items()}
    used = {names.get(id(v), names.get(id(v._base))) for v in convert_ldm_vae_checkpoint(probe, layout).values()}
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ModelFormatError(f"{source} has {len(unexpected)} tensors that are not part of a FLUX VAE (e.g. "
                               f"{unexpected[0]}); pass {HINT}.")
    return convert_ldm_vae_checkpoint(dict(state), layout)


def _norm_groups(channels: list[int]) -> int:
    groups = 32
    while groups > 1 and (groups > min(channels) // 2 or any(c % groups for c in channels)):
        groups //= 2
    return groups


def derive_vae_config(shapes: Mapping[str, tuple]) -> dict:
    """AutoencoderKL config from diffusers-layout shapes: the shipped FLUX VAE config at full size."""
    blocks = _count(shapes, "encoder.down_blocks.")
    channels = [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(blocks)]
    full = shipped_config("vae")
    derived = dict(full)
    derived.update(
        in_channels=shapes["encoder.conv_in.weight"][1],
        out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
        block_out_channels=channels,
        layers_per_block=_count(shapes, "encoder.down_blocks.0.resnets."),
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        norm_num_groups=_norm_groups(channels),
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in shapes,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )
    if all(full[k] == derived[k] for k in SIZE_KEYS):
        return full
    return derived


def build_vae(state: Mapping[str, torch.Tensor], *, config=None, source="<state dict>", load=None):
    """AutoencoderKL from a VAE state dict in either layout (real or meta); ``load(name)`` reads real tensors."""
    from diffusers import AutoencoderKL

    layout, mapping = vae_names(list(state), source)

    def convert(get) -> dict[str, torch.Tensor]:
        rel = {r: get(n) for n, r in mapping.items()}
        return bfl_vae_to_diffusers(rel, source) if layout == "bfl" else rel

    checked = convert(state.__getitem__)
    try:
        cfg = derive_vae_config({k: tuple(v.shape) for k, v in checked.items()})
    except KeyError as e:
        raise ModelFormatError(f"{source} is missing {e.args[0]}; the file is incomplete ({HINT}).") from None
    cfg.update(read_config(config))
    if cfg["latent_channels"] != FLUX_LATENT_CHANNELS:
        raise ModelFormatError(f"{source} is a VAE with {cfg['latent_channels']} latent channels (an SD/SDXL VAE?); "
                               f"FLUX needs 16: pass {HINT}.")
    return instantiate(lambda: AutoencoderKL(**cfg), checked, source, WHAT, f"pass {HINT}",
                       load=(lambda: convert(load)) if load is not None else None)


def load_vae_file(path, *, dtype, config=None):
    """The FLUX ``AutoencoderKL`` from ``ae.safetensors`` (BFL layout) or a diffusers-layout VAE file."""
    with Checkpoint(path, WHAT, HINT) as ckpt:
        vae_names(ckpt.names, ckpt.path, ckpt.wrong_file)
        return build_vae(ckpt.meta_state(), config=config, source=ckpt.path, load=lambda n: ckpt.get(n, dtype))
