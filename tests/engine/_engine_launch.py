"""Launch ComfyUI's main.py behind a loopback-only network guard.

    python _engine_launch.py <comfyui_dir> [main.py args...]

Used by the engine-tier fixtures instead of ``python main.py``.  Before main.py runs,
Python-level name lookups and socket connects to anything but loopback (127.0.0.0/8,
::1, localhost) and unix sockets are refused with an OSError, and each refusal is
printed to stderr as ``[dsd-net-guard] blocked ...`` so a test can see it (the engine
tests assert that no such line appears).  Binding is untouched: the fixture passes
``--listen 127.0.0.1``.
"""

from __future__ import annotations

import errno
import os
import runpy
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
import netguard  # noqa: E402  (tests/netguard.py: the one network guard of the tests)

sys.path.remove(_TESTS)
_PREFIX = netguard.PREFIX


def _blocked(what: str, target) -> OSError:
    print(f"{_PREFIX} blocked {what} {target!r}", file=sys.stderr, flush=True)
    return OSError(errno.ENETUNREACH, f"{_PREFIX}: network access to {target!r} is disabled in engine tests")


def _install_guard() -> None:
    netguard.install(_blocked)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    comfy_dir = os.path.abspath(sys.argv[1])
    main_py = os.path.join(comfy_dir, "main.py")
    if not os.path.isfile(main_py):
        raise SystemExit(f"no main.py in {comfy_dir}")
    if os.environ.get("DSD_NET_GUARD", "1") != "0":
        _install_guard()
    # behave like `cd comfy_dir && python main.py ...`: this file's folder must not shadow
    # anything (it holds client.py, conftest.py, models.py ...)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = [main_py] + sys.argv[2:]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
