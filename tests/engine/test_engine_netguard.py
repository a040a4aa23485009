"""The launcher's network guard (no engine needed). Runs in a subprocess whose real socket
functions are first replaced by recording stubs, so nothing can reach a network even if
the guard were broken."""

from __future__ import annotations

import json
import subprocess
import sys

from .layout import ENGINE_TESTS_DIR

_SCRIPT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
reached = []
def stub_connect(self, address):
    reached.append(["connect", list(address) if isinstance(address, tuple) else address])
    return None
def stub_getaddrinfo(host, *a, **k):
    reached.append(["getaddrinfo", host])
    return []
socket.socket.connect = stub_connect
socket.socket.connect_ex = lambda self, a: (stub_connect(self, a), 0)[1]
socket.getaddrinfo = stub_getaddrinfo
import _engine_launch
_engine_launch._install_guard()
results = {}
def attempt(name, fn):
    try:
        fn()
        results[name] = "ok"
    except OSError as e:
        results[name] = "blocked"
s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
attempt("connect 127.0.0.1", lambda: s4.connect(("127.0.0.1", 9)))
attempt("connect 127.9.9.9", lambda: s4.connect(("127.9.9.9", 9)))
attempt("connect ::1", lambda: s6.connect(("::1", 9, 0, 0)))
attempt("connect 192.0.2.1", lambda: s4.connect(("192.0.2.1", 9)))
attempt("connect_ex 10.0.0.1", lambda: s4.connect_ex(("10.0.0.1", 9)))
attempt("connect 2001:db8::1", lambda: s6.connect(("2001:db8::1", 9, 0, 0)))
attempt("getaddrinfo localhost", lambda: socket.getaddrinfo("localhost", 80))
attempt("getaddrinfo huggingface.co", lambda: socket.getaddrinfo("huggingface.co", 443))
attempt("create_connection example.invalid", lambda: socket.create_connection(("example.invalid", 80), timeout=1))
print(json.dumps({"results": results, "reached": reached}))
"""


def test_network_guard_blocks_everything_but_loopback():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(ENGINE_TESTS_DIR)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    r = out["results"]
    assert r["connect 127.0.0.1"] == r["connect 127.9.9.9"] == r["connect ::1"] == "ok"
    assert r["getaddrinfo localhost"] == "ok"
    for k in ("connect 192.0.2.1", "connect_ex 10.0.0.1", "connect 2001:db8::1",
              "getaddrinfo huggingface.co", "create_connection example.invalid"):
        assert r[k] == "blocked", (k, r)
    reached_hosts = {str(x[1][0] if isinstance(x[1], list) else x[1]) for x in out["reached"]}
    assert reached_hosts <= {"127.0.0.1", "127.9.9.9", "::1", "localhost"}, out["reached"]
    assert "[dsd-net-guard] blocked" in proc.stderr
