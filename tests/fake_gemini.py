"""Test helpers: a fake Gemini REST server on 127.0.0.1 and a socket guard.

``FakeGemini`` is a real threaded HTTP server (free port on 127.0.0.1) that
answers ``POST /{version}/models/{model}:generateContent`` the way the Gemini
API does (JSON in the real response shape, Google-style error bodies). Each
request is recorded (path, headers, parsed JSON body). Scenarios:

* ``success``: a caption for requests carrying an image, an enhanced prompt
  for text-only requests;
* ``slow``: waits ``delay`` seconds before answering (client timeouts);
* ``429-then-success``: the first request gets HTTP 429, later ones succeed;
* ``500``: always HTTP 500;
* ``400``: always HTTP 400 (like an invalid API key; must not be retried);
* ``malformed``: HTTP 200 with a body that is not JSON;
* ``empty``: HTTP 200 with ``"candidates": []``;
* ``blocked``: HTTP 200 with ``promptFeedback.blockReason`` and no candidates.

The network guard of every test (``tests/netguard.py``, installed by conftest) keeps the fake the only server a
test can reach.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CAPTION_REPLY = '  "A red fox with a white-tipped tail sitting on a mossy rock,\nsoft morning light, eye-level shot"  \n'
ENHANCED_REPLY = "A red fox with a white-tipped tail\r\n on a sunny beach, soft morning light, eye-level shot\n"
SCENARIOS = ("success", "slow", "429-then-success", "500", "400", "malformed", "empty", "blocked")


def _has_image(body) -> bool:
    try:
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                if "inlineData" in part or "inline_data" in part:
                    return True
    except AttributeError:
        pass
    return False


def _success_body(text: str, model: str) -> dict:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 40, "totalTokenCount": 340},
        "modelVersion": model,
        "responseId": "fake-response-id",
    }


def _error_body(code: int, status: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


class FakeGemini:
    """Threaded fake of the Gemini ``generateContent`` endpoint (use as a context manager)."""

    def __init__(self, scenario: str = "success", *, delay: float = 2.0,
                 caption: str = CAPTION_REPLY, enhanced: str = ENHANCED_REPLY):
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        self.scenario = scenario
        self.delay = delay
        self.caption = caption
        self.enhanced = enhanced
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> "FakeGemini":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with fake._lock:
                    index = len(fake.requests)
                    fake.requests.append({
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    })
                status, payload = fake._respond(self.path, body, index)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _respond(self, path: str, body, index: int):
        if not (path.startswith("/v1") and ":generateContent" in path and "/models/" in path):
            return 404, _error_body(404, "NOT_FOUND", f"unknown path {path}")
        model = path.split("/models/", 1)[1].split(":", 1)[0]
        scenario = self.scenario
        if scenario == "slow":
            self._stop.wait(self.delay)
            scenario = "success"
        if scenario == "429-then-success":
            if index == 0:
                return 429, _error_body(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).")
            scenario = "success"
        if scenario == "500":
            return 500, _error_body(500, "INTERNAL", "An internal error has occurred.")
        if scenario == "400":
            return 400, _error_body(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        if scenario == "malformed":
            return 200, b'{"candidates": [{"content": {"parts": [{"text": "trunc'
        if scenario == "empty":
            return 200, {"candidates": [], "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10},
                         "modelVersion": model}
        if scenario == "blocked":
            return 200, {"promptFeedback": {"blockReason": "SAFETY"},
                         "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}, "modelVersion": model}
        text = self.caption if _has_image(body) else self.enhanced
        return 200, _success_body(text, model)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Remove every credential/endpoint variable and point the prompt cache at a temp dir."""
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DSD_GEMINI_KEY_FILE", "DSD_GEMINI_MODEL",
                 "DSD_GEMINI_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE",
                 "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_GEMINI_BASE_URL",
                 "GOOGLE_GENAI_API_VERSION", "DSD_LOCAL_VLM_PATH", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("DSD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from dsd_core.prompt import clear_memory_cache

    clear_memory_cache()
    yield tmp_path
    clear_memory_cache()
