"""Drive ComfyUI's real web frontend (the one the engine serves) in headless Chromium through Playwright.

Used by ``test_engine_frontend.py``. The browser is the system Chromium (``/usr/bin/chromium``, or ``$DSD_CHROMIUM``);
Playwright's own browser downloads (``playwright install``) are never used. Only loopback is reachable from the page:
every other request is aborted (and recorded in ``Frontend.blocked``), and Chromium runs with a dead proxy
(``127.0.0.1:9``), which loopback bypasses, for requests outside the page (the frontend looks up node types on
api.comfy.org, for one).

What the page does is the frontend's own code: ``app.loadGraphData`` (what dropping a workflow on the canvas or picking
it in the Templates browser calls), ``app.graphToPrompt`` (the UI workflow -> API prompt conversion done on *Run*),
``app.queuePrompt(0, 1)`` (the *Run* / Queue button). Edits (``apply_prompt``) go through the LiteGraph node API a
user's clicks end in: widget values set, nodes created, removed and connected.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path

import pytest

#: settings for a first visit without the welcome/templates dialog (a fresh user directory shows it)
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
            # no restoring of the last session's tabs on (re)load: each test loads what it checks
            "Comfy.Workflow.Persist": False,
            # draw widgets and titles at any zoom (a fitted view of a whole workflow is below the default LOD size)
            "LiteGraph.Canvas.MinFontSizeForLOD": 0, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_path() -> str | None:
    """The system Chromium: ``$DSD_CHROMIUM``, else the first of chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("DSD_CHROMIUM")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# ------------------------------------------------------------------------------------------------ page-side code
_READY = """() => !!(window.app && window.app.vueAppReady && window.LiteGraph && window.LiteGraph.registered_node_types
    && window.LiteGraph.registered_node_types[%s] && window.app.graph)"""

# the text of a "missing node(s)" dialog (1.32) or toast (1.49) on the page, or null
_MISSING_TEXT = """() => {
  const shown = '.p-dialog, .p-toast-message, [role=dialog], [role=alert], [role=status]';
  const text = Array.from(document.querySelectorAll(shown)).map(d => d.innerText).join('\\n');
  return /missing node/i.test(text) ? text.slice(0, 2000) : null;
}"""

_LOAD = """async ([wf, name]) => {
  await app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 300));  // dialogs / toasts the load raises
  const nodes = app.graph.nodes;
  return {
    count: nodes.length,
    unknown: nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
    errors: nodes.filter(n => n.has_errors).map(n => n.type),
    missing_text: (%s)(),
  };
}""" % _MISSING_TEXT

_TO_PROMPT = """async () => (await app.graphToPrompt()).output"""

# Make the loaded graph produce ``want`` (an API prompt): nodes of another class (or not in ``want``) are removed,
# missing ones created with the same id at the old position, links connected, widget values set.
_APPLY = """async (want) => {
  const g = app.graph;
  const find = id => g.nodes.find(n => String(n.id) === String(id));
  const positions = {};
  for (const n of [...g.nodes]) {
    if (n.isVirtualNode) continue;  // Note etc.: not part of the prompt
    const w = want[String(n.id)];
    if (!w || w.class_type !== n.type) { positions[String(n.id)] = [...n.pos]; g.remove(n); }
  }
  for (const [id, w] of Object.entries(want)) {
    if (find(id)) continue;
    const n = LiteGraph.createNode(w.class_type);
    if (!n) throw new Error('cannot create node ' + w.class_type);
    n.id = typeof g.nodes[0]?.id === 'number' ? Number(id) : id;
    if (positions[id]) n.pos = positions[id];
    g.add(n);
    if (String(n.id) !== String(id)) throw new Error('node ' + w.class_type + ' got id ' + n.id + ', not ' + id);
  }
  for (const [id, w] of Object.entries(want)) {
    const n = find(id);
    for (const [name, value] of Object.entries(w.inputs)) {
      if (Array.isArray(value)) {
        const src = find(value[0]);
        const slot = n.findInputSlot(name);
        if (!src || slot < 0) throw new Error('cannot link ' + value + ' to ' + w.class_type + '.' + name);
        const lid = n.inputs[slot].link;  // g.links: an object (older LiteGraph) or a Map
        const cur = lid != null ? (g.links[lid] ?? g.links.get?.(lid)) : null;
        if (cur && String(cur.origin_id) === String(src.id) && cur.origin_slot === value[1]) continue;
        if (!src.connect(value[1], n, slot)) throw new Error('connect failed: ' + value + ' -> ' + id + '.' + name);
      } else {
        const widget = (n.widgets || []).find(x => x.name === name);
        if (!widget) throw new Error(w.class_type + ' (node ' + id + ') has no widget ' + name);
        widget.value = value;
      }
    }
  }
  g.setDirtyCanvas(true, true);
  return (await app.graphToPrompt()).output;
}"""

# The Run button: app.queuePrompt(0, 1); the prompt id is read from the frontend's own POST /prompt answer.
_QUEUE = """async () => {
  const api = app.api;
  const original = api.queuePrompt;
  let answer = null;
  api.queuePrompt = async function (...args) { answer = await original.apply(this, args); return answer; };
  try { await app.queuePrompt(0, 1); } finally { api.queuePrompt = original; }
  return answer;
}"""

_FIT_VIEW = """async () => {
  const cmd = app.extensionManager && app.extensionManager.command;
  try { if (cmd) { await cmd.execute('Comfy.Canvas.FitView'); } } catch (e) { /* older frontends */ }
  app.graph.setDirtyCanvas(true, true);
  await new Promise(r => setTimeout(r, 500));
}"""


class FrontendError(AssertionError):
    pass


class Frontend:
    """One headless Chromium page on the engine's web UI."""

    def __init__(self, base_url: str, chromium: str):
        from playwright.sync_api import sync_playwright

        self.base_url = base_url.rstrip("/")
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.blocked: list[str] = []
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=chromium, headless=True,
                args=["--no-sandbox", "--proxy-server=http://127.0.0.1:9", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run", "--disable-gpu"])
            self.page = self.new_page()
        except Exception:
            self._pw.stop()
            raise
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text[:500]}"))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)[:2000]))
        self.version: str | None = None

    def new_page(self, routed: bool = True):
        """A page of this browser; ``routed``: non-loopback requests aborted (and recorded)."""
        page = self._browser.new_page(viewport={"width": 1600, "height": 1000})
        if routed:
            page.route("**/*", self._route)
        return page

    def _route(self, route) -> None:
        url = route.request.url
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme in ("data", "blob") or (parsed.hostname or "") in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")

    def open(self, probe_type: str = "DSDSampler", timeout: float = 120.0) -> None:
        """Load the UI and wait until the app is up and knows the server's node types (``probe_type`` among them)."""
        self.page.goto(self.base_url + "/", wait_until="domcontentloaded", timeout=timeout * 1000)
        try:
            self.page.wait_for_function(_READY % json.dumps(probe_type), timeout=timeout * 1000, polling=200)
        except Exception as e:  # noqa: BLE001 - re-raised with the page's view
            raise FrontendError(f"the ComfyUI frontend did not come up within {timeout:.0f}s: {e}\n"
                                f"{self.diagnostics()}")
        self.version = self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")

    def load(self, workflow: dict, name: str) -> dict:
        """``app.loadGraphData`` (dropping the workflow on the canvas); returns the load report:
        ``{"count", "unknown": [types], "errors": [types], "missing_text": str | None}``."""
        return self.page.evaluate(_LOAD, [workflow, name])

    def wait_missing_text(self, timeout: float = 15.0) -> str | None:
        """The missing-node warning's text once it shows (None if it does not within ``timeout``)."""
        try:
            return self.page.wait_for_function(_MISSING_TEXT, timeout=timeout * 1000, polling=100).json_value()
        except Exception:  # noqa: BLE001 - playwright's TimeoutError
            return None

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate(_TO_PROMPT)

    def apply_prompt(self, want: dict) -> dict:
        """Edit the loaded graph until it produces the API prompt ``want``; returns ``graphToPrompt``'s output."""
        return self.page.evaluate(_APPLY, want)

    def queue(self) -> dict:
        """Press Run (``app.queuePrompt(0, 1)``); returns the server's answer ``{"prompt_id", "number", ...}``."""
        answer = self.page.evaluate(_QUEUE)
        if not answer or "prompt_id" not in answer:
            raise FrontendError(f"app.queuePrompt did not queue: {answer!r}\n{self.diagnostics()}")
        return answer

    def screenshot(self, path: Path, fit: bool = True, **kw) -> Path:
        if fit:
            self.page.evaluate(_FIT_VIEW)
        self.page.screenshot(path=str(path), **kw)
        return Path(path)

    def diagnostics(self) -> str:
        return ("page errors:\n  " + "\n  ".join(self.page_errors[-10:]) + "\nconsole (last 20):\n  "
                + "\n  ".join(self.console[-20:]) + "\nblocked requests:\n  " + "\n  ".join(self.blocked[-10:]))

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_browser() -> str:
    """Chromium's path and an importable Playwright, else skip (a failure under CI=true: .ci/run installs both)."""
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        problems.append(f"playwright is not importable ({e}); `pip install -e .[test]` installs it")
    chromium = chromium_path()
    if chromium is None:
        problems.append("no Chromium found (chromium / chromium-browser / google-chrome on PATH, or $DSD_CHROMIUM): "
                        "`apt-get install chromium`; Playwright's own browser download is not used")
    if problems:
        msg = "frontend tier: " + "; ".join(problems)
        if in_ci():
            pytest.fail("CI=true and " + msg, pytrace=False)
        pytest.skip(msg)
    return chromium
