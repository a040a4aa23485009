"""The one network guard of the tests: name lookups, connects and datagrams to anything but loopback (127.0.0.0/8,
::1, localhost) are refused. Unix sockets and binding are untouched.

* ``tests/conftest.py`` installs it in the test process (a refusal is a ``RuntimeError``, so the test fails loudly
  instead of a library treating it as "offline");
* ``tests/engine/_engine_launch.py`` installs it in the ComfyUI server it starts (a refusal is an ``OSError``, so the
  server keeps running, and a ``[dsd-net-guard] blocked ...`` line on stderr that the engine tests look for).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

PREFIX = "[dsd-net-guard]"


def is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0]
    if host in ("", "localhost", "localhost.localdomain", "ip6-localhost"):  # "": any local interface (bind)
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_error(what: str, target) -> Exception:
    return RuntimeError(f"test tried to reach the network ({what} {target!r}); tests must stay on 127.0.0.1")


def install(error: Callable[[str, object], Exception] = default_error) -> None:
    """Patch ``socket`` so that every non-loopback lookup/connect/sendto raises ``error(what, target)``."""
    orig_getaddrinfo = socket.getaddrinfo
    orig_gethostbyname = socket.gethostbyname
    orig_gethostbyname_ex = socket.gethostbyname_ex
    orig_connect = socket.socket.connect
    orig_connect_ex = socket.socket.connect_ex
    orig_sendto = socket.socket.sendto

    def check(sock, address, what):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not is_loopback(address[0]):
                raise error(what, address)

    def getaddrinfo(host, *args, **kwargs):
        if not is_loopback(host):
            raise error("getaddrinfo", host)
        return orig_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):
        if not is_loopback(host):
            raise error("gethostbyname", host)
        return orig_gethostbyname(host)

    def gethostbyname_ex(host):
        if not is_loopback(host):
            raise error("gethostbyname_ex", host)
        return orig_gethostbyname_ex(host)

    def connect(self, address):
        check(self, address, "connect")
        return orig_connect(self, address)

    def connect_ex(self, address):
        check(self, address, "connect")
        return orig_connect_ex(self, address)

    def sendto(self, data, *args):
        if args:
            check(self, args[-1], "sendto")
        return orig_sendto(self, data, *args)

    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
