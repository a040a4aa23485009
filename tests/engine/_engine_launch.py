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
import ipaddress
import os
import runpy
import socket
import sys

_PREFIX = "[dsd-net-guard]"


def _loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%", 1)[0]
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _blocked(what: str, target) -> OSError:
    print(f"{_PREFIX} blocked {what} {target!r}", file=sys.stderr, flush=True)
    return OSError(errno.ENETUNREACH, f"{_PREFIX}: network access to {target!r} is disabled in engine tests")


def _install_guard() -> None:
    orig_getaddrinfo = socket.getaddrinfo
    orig_gethostbyname = socket.gethostbyname
    orig_gethostbyname_ex = socket.gethostbyname_ex
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_sendto = socket.socket.sendto

    def _check_addr(sock, address, what):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not _loopback(address[0]):
                raise _blocked(what, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{_PREFIX}: lookup of {host!r} is disabled") \
                from _blocked("getaddrinfo", host)
        return orig_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):
        if not _loopback(host):
            raise _blocked("gethostbyname", host)
        return orig_gethostbyname(host)

    def gethostbyname_ex(host):
        if not _loopback(host):
            raise _blocked("gethostbyname_ex", host)
        return orig_gethostbyname_ex(host)

    def connect(self, address):
        _check_addr(self, address, "connect")
        return orig_connect(self, address)

    def connect_ex(self, address):
        _check_addr(self, address, "connect")
        return orig_connect_ex(self, address)

    def sendto(self, data, *args):
        if args:
            _check_addr(self, args[-1], "sendto")
        return orig_sendto(self, data, *args)

    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto


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
