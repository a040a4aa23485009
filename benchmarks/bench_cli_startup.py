"""How fast the command line starts: wall time of `--help`, `generate --help` and `memory` (the estimates), each
in a fresh Python, against the bare `python -c pass` start. Goal (issue #10): under 2 s on a 2-core machine.

    python benchmarks/bench_cli_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"python -c pass": ["-c", "pass"], "--help": ["-m", "dsd_core", "--help"],
            "generate --help": ["-m", "dsd_core", "generate", "--help"], "memory": ["-m", "dsd_core", "memory"],
            "import torch (for scale)": ["-c", "import torch"]}


def wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    n = ap.parse_args().repeat
    base = statistics.median(wall(COMMANDS["python -c pass"]) for _ in range(n))
    print("| command | median wall time | x bare python |\n|---|---|---|")
    for name, args in COMMANDS.items():
        t = statistics.median(wall(args) for _ in range(n))
        print(f"| {name} | {t:.2f} s | {t / base:.1f} |")


if __name__ == "__main__":
    main()
