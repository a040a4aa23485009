"""Running the CLI in other processes from tests: one environment and one ``accelerate launch`` prefix, so runs in
1 or 2 processes are comparable byte for byte.

One CPU thread per process (kernels' sums depend on the thread count) and Intel MKL's reproducible code path
(``MKL_CBWR=COMPATIBLE``: otherwise MKL picks code paths by memory alignment, which differs between processes, and a
pixel can differ in its last bit; seen on a 2-core machine).
"""

from __future__ import annotations

import os
import sys

from conftest import ROOT


def cli_env() -> dict:
    """The environment for a ``python -m dsd_core`` subprocess (this checkout importable, offline, reproducible)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="COMPATIBLE", HF_HUB_OFFLINE="1")


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``num_processes`` CPU processes (gloo), one thread each; append ``-m dsd_core ...``."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]
