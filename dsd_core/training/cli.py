"""``python -m dsd_core train``: train a model from paired images (the engine in :mod:`dsd_core.training.engine`).

Every option of :class:`~dsd_core.training.config.TrainConfig` and of the method's options dataclass is a flag
(``max_steps`` -> ``--max-steps``) and a key of the ``--config FILE.yaml`` file; flags win over the file. Multi-GPU:
``accelerate launch --num_processes N -m dsd_core train ...``.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .config import TrainConfig, add_config_arguments
    from .methods import METHODS, get_method

    p = subparsers.add_parser(
        "train", help="train a DSD model (LoRA + c_embedder) from paired images",
        description="Train on a paired dataset (a folder with metadata.jsonl, or local Hugging Face parquet/arrow "
                    "files). OUTPUT becomes a DSD model folder for `generate --model OUTPUT`; checkpoints and logs go "
                    "inside it. Run under `accelerate launch` for several GPUs.",
        )
    p.add_argument("--config", default=None, help="YAML file of options (keys = the flag names with _); flags win")
    p.add_argument("--method", choices=list(METHODS), help="what to train (default: dsd-lora, or the config's method)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-example-config", action="store_true",
                   help="print a commented YAML with every option and exit")
    seen: set = set()
    add_config_arguments(p, TrainConfig, seen=seen)
    for name in METHODS:  # every method's options (a flag of another method is rejected at run time)
        cls = get_method(name).Options
        add_config_arguments(p, cls, title=f"{name} options: " + (cls.__doc__ or "").splitlines()[0], seen=seen)
    return p


EXAMPLE_HEADER = """\
# Example configuration of `python -m dsd_core train --config train_dsd.example.yaml` (method dsd-lora).
# Every key is also a flag (max_steps -> --max-steps); flags given on the command line override this file.
# Settings for one 24 GB GPU (estimated peak ~18 GiB): fp8 frozen transformer and text encoders, rank 32, batch
# 1 x 4 accumulation, gradient checkpointing.
# The paper trained rank 512, effective batch 160, lr 1e-4, 100k steps on 8x H100 80 GB.
# Regenerate with: python -m dsd_core train --print-example-config > dsd_core/training/train_dsd.example.yaml
method: dsd-lora

"""
#: The example's values that differ from the defaults.
EXAMPLE_VALUES = {"data": "my_pairs/", "output": "models/dsd/my_dsd", "from_flux": "FLUX.1-dev/transformer",
                  "base": "FLUX.1-dev", "base_weights": "fp8", "text_encoder_weights": "fp8", "max_steps": 2000,
                  "gradient_accumulation": 4}


def example_config() -> str:
    """The commented example config (every option, with the example's values)."""
    from .config import TrainConfig, example_yaml
    from .methods.dsd_lora import DSDLoRAOptions

    return EXAMPLE_HEADER + example_yaml(TrainConfig, DSDLoRAOptions, values=EXAMPLE_VALUES)


def run(args) -> int:
    from .config import TrainConfig, config_from_args, read_yaml
    from .engine import Trainer
    from .methods import get_method

    if args.print_example_config:
        print(example_config(), end="")
        return 0
    method_name = args.method or "dsd-lora"
    if args.config and not args.method:
        method_name = read_yaml(args.config).get("method", method_name)
    method_cls = get_method(method_name)
    config, options = config_from_args(args, TrainConfig, method_cls.Options, ignore=("method",))
    result = Trainer(config, method_cls(config, options), progress_bar=not args.quiet).train()
    if result.interrupted:
        print(f"training stopped at step {result.step}; resume with --resume latest --output {result.output_dir}",
              file=sys.stderr)
        return 130
    print(f"trained {result.step} steps; model folder: {result.output_dir}")
    return 0
