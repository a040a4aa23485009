"""Command line: ``python -m dsd_core <command> ...`` (also installed as ``dsd``).

A command is a module with ``add_parser(subparsers)`` (adds one or more parsers) and ``run(args) -> int``, listed in
:data:`COMMANDS`. Command modules import nothing heavy at module level (torch, diffusers, ...: only inside ``run``),
so ``--help`` and light commands start fast. To add a command, write its module and add one line to the list.

Other libraries' warnings (torch, torchao, transformers, diffusers, ...) are silenced at their source on a normal
run; ``-v`` shows them and debug logs. ``-q`` prints only errors and the results (e.g. the saved path).

Any failure is one ``error:`` line with the fix (:func:`dsd_core.error_report.report`; exit 2 for a problem the user
can fix, 1 for an unexpected one); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

#: The commands, in ``--help`` order: one module each (see the module docstring).
COMMANDS = [
    "dsd_core.commands.generate",
    "dsd_core.commands.tiny_model",
    "dsd_core.commands.memory",
    "dsd_core.training.cli",  # train
    "dsd_core.datagen.cli",  # datagen
    "dsd_core.custom_diffusion.cli",  # custom-diffusion train|merge|compress|generate|export-comfyui
    "dsd_core.distill.cli",  # distill data|prune|train|eval
    "dsd_core.commands.native",  # extract-c-embedder, compare-transformers
]

#: Loggers of other libraries whose warnings say nothing a user of this CLI can act on (shown with ``-v``).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "diffusers", "transformers", "accelerate", "peft",
                 "huggingface_hub")
NOISY_PACKAGES = r"(torch|torchao|torchvision|transformers|diffusers|accelerate|peft|huggingface_hub|timm)(\.|$)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsd_core",
                                     description="Diffusion Self-Distillation: subject-preserving generation on "
                                                 "FLUX.1-dev.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and other libraries' warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors and results (no progress bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(name)
        before = set(sub.choices)
        module.add_parser(sub)
        for command in set(sub.choices) - before:  # a module may add several commands
            sub.choices[command].set_defaults(_run=module.run)
    return parser


def quiet_other_libraries(verbose: bool, quiet: bool) -> None:
    """Silence other libraries' warnings at their source (their loggers and Python warnings) unless ``verbose``;
    with ``quiet`` also their progress bars. Called before any of them is imported."""
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", module=NOISY_PACKAGES)
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # download bars
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's default: "Loading pipeline components" / "checkpoint shards" bars


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_other_libraries(args.verbose, args.quiet)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args._run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one `error:` line (DSDError, or translated when known); the traceback only with -v
        from .error_report import report

        return report(e, args.verbose)
