"""Gemini backend for prompt enhancement.

Uses the ``google-genai`` SDK (``from google import genai``). Only when that
package is not installed does it fall back to the older ``google-generativeai``
package; neither is imported until a request is made, so importing this module
never needs them.

Credentials (never from a function argument that could hold the key itself):

* an explicit ``key_file=`` path (a file whose content is the key), else
* the ``GOOGLE_API_KEY`` or ``GEMINI_API_KEY`` environment variable
  (``GOOGLE_API_KEY`` wins if both are set, as in the SDK), else
* a key file named by the ``DSD_GEMINI_KEY_FILE`` environment variable.
* Vertex AI: set ``GOOGLE_GENAI_USE_VERTEXAI=true`` plus ``GOOGLE_CLOUD_PROJECT``
  and ``GOOGLE_CLOUD_LOCATION``; the SDK then authenticates with Application
  Default Credentials (no API key needed).

Other settings: model from the ``model`` argument, else ``DSD_GEMINI_MODEL``,
else :data:`DEFAULT_GEMINI_MODEL`; endpoint from ``base_url=`` or
``DSD_GEMINI_BASE_URL`` (passed to the SDK as ``HttpOptions(base_url=...)``).

Each request has a bounded timeout. Timeouts, connection errors, HTTP 408, 429
and 5xx are retried with exponential backoff (``backoff * 2**n`` seconds, capped
at ``max_backoff``); other 4xx are not retried. The SDK's own retries are
switched off so that this is the only retry loop.

The key is kept in a :class:`_Secret` wrapper whose ``repr``/``str`` hide it;
error messages are built here from status codes and class names and are
scrubbed of the key before they leave this module.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import warnings

from PIL import Image

from .base import CAPTION_INSTRUCTION, EnhanceError, build_enhance_instruction, clean_reply, prepare_reference

logger = logging.getLogger(__name__)

DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"

_KEY_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
_NO_KEY = (
    "no Gemini API key found (set GEMINI_API_KEY or GOOGLE_API_KEY, or point DSD_GEMINI_KEY_FILE at a key file)"
)
_BLOCK_FINISH_REASONS = {
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT",
}


class _Secret:
    """Holds a credential; ``repr``/``str`` never show it and it cannot be pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a secret cannot be pickled")


def _read_key_file(path: str, origin: str) -> _Secret:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise EnhanceError(f"the Gemini key file given by {origin} could not be read ({type(exc).__name__})") from None
    if not value:
        raise EnhanceError(f"the Gemini key file given by {origin} is empty")
    return _Secret(value)


def resolve_api_key(key_file: str | os.PathLike | None = None) -> _Secret | None:
    """Find the Gemini API key (see the module docstring for the order).

    Returns None when no key is configured. Raises :class:`EnhanceError` when a
    configured key file cannot be read.
    """
    if key_file:
        return _read_key_file(os.fspath(key_file), "key_file=")
    for name in _KEY_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return _Secret(value)
    env_file = os.environ.get("DSD_GEMINI_KEY_FILE", "").strip()
    if env_file:
        return _read_key_file(env_file, "DSD_GEMINI_KEY_FILE")
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _redact(text: str, secret: _Secret | None) -> str:
    if secret is not None and secret.reveal():
        text = text.replace(secret.reveal(), "***")
    return text


class _ReplyProblem(Exception):
    """The server answered, but not with a usable text (not retried)."""


def _name(value) -> str:
    return str(getattr(value, "name", value) or "")


def _reply_text(response) -> str:
    """Extract and clean the text of a generateContent response (either SDK)."""
    candidates = list(getattr(response, "candidates", None) or [])
    if not candidates:
        feedback = getattr(response, "prompt_feedback", None)
        reason = _name(getattr(feedback, "block_reason", None)) if feedback is not None else ""
        if reason and reason not in ("BLOCK_REASON_UNSPECIFIED", "0"):
            raise _ReplyProblem(f"blocked the request (reason {reason})")
        raise _ReplyProblem("returned no candidates")
    candidate = candidates[0]
    content = getattr(candidate, "content", None)
    parts = list(getattr(content, "parts", None) or [])
    text = "".join(
        p.text for p in parts if isinstance(getattr(p, "text", None), str) and not getattr(p, "thought", False)
    )
    text = clean_reply(text)
    if not text:
        finish = _name(getattr(candidate, "finish_reason", None))
        if finish in _BLOCK_FINISH_REASONS:
            raise _ReplyProblem(f"blocked the reply (finish reason {finish})")
        raise _ReplyProblem("returned an empty reply")
    return text


def _status_code(exc: BaseException) -> int | None:
    for value in (getattr(exc, "code", None), getattr(exc, "status_code", None),
                  getattr(getattr(exc, "response", None), "status_code", None)):
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


_METHOD_URL_PREFIX = re.compile(r"^[A-Z]+ \S+://\S+: ")
_URL = re.compile(r"\S+://\S+")
_CONNECTION_ERRORS = {"ConnectError", "ConnectionError", "NetworkError", "RemoteProtocolError", "ReadError"}


def _classify(exc: BaseException, timeout: float) -> tuple[bool, str]:
    """Return (retryable, cause) for an exception raised by an SDK call."""
    code = _status_code(exc)
    if code is not None:
        msg = getattr(exc, "message", None)
        msg = _URL.sub("<url>", _METHOD_URL_PREFIX.sub("", msg)) if isinstance(msg, str) else ""
        detail = f": {msg[:160]}" if msg else ""
        if code == 429:
            return True, f"quota or rate limit exceeded (HTTP 429{detail})"
        if code == 408 or code >= 500:
            return True, f"server error (HTTP {code}{detail})"
        if code in (401, 403):
            return False, f"credentials refused (HTTP {code}{detail})"
        return False, f"request rejected (HTTP {code}{detail})"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, TimeoutError) or any("Timeout" in n for n in names) or "DeadlineExceeded" in names:
        return True, f"request timed out (limit {timeout:g} s per attempt)"
    if isinstance(exc, ConnectionError) or names & _CONNECTION_ERRORS:
        return True, f"endpoint unreachable ({type(exc).__name__})"
    if names & {"UnknownApiResponseError", "JSONDecodeError", "ValidationError", "ParseError", "DecodeError"}:
        return False, "response malformed (not valid JSON in the expected shape)"
    if names & {"DefaultCredentialsError", "RefreshError"}:
        return False, (
            f"credentials unavailable ({type(exc).__name__}; for Vertex AI run "
            "'gcloud auth application-default login' or set GOOGLE_APPLICATION_CREDENTIALS)"
        )
    return False, f"call failed unexpectedly ({type(exc).__name__})"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_list(png: bytes | list[bytes] | None) -> list[bytes]:
    """One image, several (sent in order after the text) or none."""
    if png is None:
        return []
    return [png] if isinstance(png, bytes) else list(png)


class _GenaiTransport:
    """One ``google-genai`` client; ``generate`` sends one user turn."""

    def __init__(self, key: _Secret | None, vertex: bool, base_url: str | None, timeout: float):
        import google.genai as genai
        from google.genai import types

        self._types = types
        options = types.HttpOptions(
            base_url=base_url or None,
            timeout=max(1, int(round(timeout * 1000))),
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        if vertex:
            self._client = genai.Client(vertexai=True, http_options=options)
        else:
            self._client = genai.Client(api_key=key.reveal(), http_options=options)

    def generate(self, model: str, text: str, png: bytes | list[bytes] | None) -> str:
        types = self._types
        parts = [types.Part.from_text(text=text)]
        for data in _png_list(png):
            parts.append(types.Part.from_bytes(data=data, mime_type="image/png"))
        response = self._client.models.generate_content(
            model=model,
            contents=[types.Content(role="user", parts=parts)],
            config=types.GenerateContentConfig(
                automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)
            ),
        )
        return _reply_text(response)

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()


class _LegacyTransport:
    """Fallback on the deprecated ``google-generativeai`` package (REST transport)."""

    def __init__(self, key: _Secret, base_url: str | None, timeout: float):
        import google.generativeai as legacy

        options = {"api_endpoint": base_url} if base_url else None
        legacy.configure(api_key=key.reveal(), transport="rest", client_options=options)
        self._legacy = legacy
        self._timeout = timeout

    def generate(self, model: str, text: str, png: bytes | list[bytes] | None) -> str:
        parts: list = [text]
        for data in _png_list(png):
            parts.append({"mime_type": "image/png", "data": data})
        response = self._legacy.GenerativeModel(model).generate_content(
            parts, request_options={"timeout": self._timeout}
        )
        return _reply_text(response)

    def close(self) -> None:
        pass


def _sdk_available() -> str | None:
    """Return "genai", "legacy" or None depending on the installed packages."""
    try:
        import google.genai  # noqa: F401

        return "genai"
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():  # its import warns that the package is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            import google.generativeai  # noqa: F401

        return "legacy"
    except ImportError:
        return None


class GeminiEnhancer:
    """Two-call prompt enhancement through the Gemini API (see module docstring).

    Args:
        model: Gemini model name; empty means DSD_GEMINI_MODEL or the default.
        timeout: seconds allowed for each HTTP request.
        retries: extra attempts after a retryable failure (0 = try once).
        backoff: first retry delay in seconds; doubles on each retry.
        max_backoff: upper bound of one retry delay.
        base_url: endpoint override; else DSD_GEMINI_BASE_URL; else the SDK default.
        key_file: path of a file holding the API key (overrides the env vars).
    """

    name = "gemini"

    def __init__(
        self,
        model: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 8.0,
        base_url: str | None = None,
        key_file: str | os.PathLike | None = None,
    ):
        self.model = (model or "").strip() or os.environ.get("DSD_GEMINI_MODEL", "").strip() or DEFAULT_GEMINI_MODEL
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = max(0.0, float(backoff))
        self.max_backoff = max(0.0, float(max_backoff))
        self.base_url = (base_url or os.environ.get("DSD_GEMINI_BASE_URL", "")).strip() or None
        self._key_file = os.fspath(key_file) if key_file else None

    @property
    def cache_id(self) -> str:
        """Model identity used in the cache key."""
        return self.model

    def __repr__(self) -> str:
        return (
            f"GeminiEnhancer(model={self.model!r}, base_url={self.base_url!r}, timeout={self.timeout:g}, "
            f"retries={self.retries})"
        )

    def _open(self, key: _Secret | None, vertex: bool):
        if key is not None and _plain_http(self.base_url):
            logger.warning("the Gemini base URL %s is plain http:// to another machine: the API key travels "
                           "unencrypted. Use https:// (or a proxy on localhost).", self.base_url)
        sdk = _sdk_available()
        if sdk is None:
            raise EnhanceError("the google-genai package is not installed (pip install google-genai)")
        try:
            if sdk == "genai":
                return _GenaiTransport(key, vertex, self.base_url, self.timeout)
            if vertex:
                raise EnhanceError("Vertex AI needs the google-genai package (pip install google-genai)")
            return _LegacyTransport(key, self.base_url, self.timeout)
        except EnhanceError:
            raise
        except Exception as exc:  # SDK validation or credential lookup failures
            detail = _redact(str(exc), key).splitlines()[0][:160] if str(exc) else ""
            raise EnhanceError(
                f"the Gemini client could not be created ({type(exc).__name__}{': ' + detail if detail else ''})"
            ) from None

    def _call(self, transport, text: str, png: bytes | None, step: str, key: _Secret | None) -> str:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return transport.generate(self.model, text, png)
            except _ReplyProblem as exc:
                raise EnhanceError(_redact(f"Gemini {exc} in the {step} step", key)) from None
            except Exception as exc:
                retryable, cause = _classify(exc, self.timeout)
                cause = _redact(cause, key)
                if retryable and attempt + 1 < attempts:
                    delay = min(self.max_backoff, self.backoff * (2**attempt))
                    logger.info(
                        "Gemini %s call failed (%s); retry %d of %d in %.2f s", step, cause, attempt + 1,
                        self.retries, delay,
                    )
                    time.sleep(delay)
                    continue
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise EnhanceError(f"Gemini {cause}{tries} in the {step} step") from None
        raise AssertionError("unreachable")

    def _session(self, calls):
        """Resolve credentials, open one transport, run ``calls(call)`` with ``call(text, png, step)``, close."""
        key = resolve_api_key(self._key_file)
        vertex = _env_flag("GOOGLE_GENAI_USE_VERTEXAI")
        if key is None and not vertex:
            raise EnhanceError(_NO_KEY)
        transport = self._open(key, vertex)
        try:
            return calls(lambda text, png, step: self._call(transport, text, png, step, key))
        finally:
            try:
                transport.close()
            except Exception:  # closing must never mask the result
                pass

    def enhance(self, image: Image.Image, prompt: str) -> tuple[str, str]:
        """Return ``(enhanced_prompt, caption)``; raise :class:`EnhanceError` on any failure."""
        def calls(call):
            caption = call(CAPTION_INSTRUCTION, _png_bytes(prepare_reference(image)), "caption")
            return call(build_enhance_instruction(prompt, caption), None, "enhance"), caption

        return self._session(calls)

    def ask(self, text: str, images=(), step: str = "request") -> str:
        """One request: ``text`` then ``images`` (PIL, sent as PNG in order); the reply cleaned to one line.

        Same credentials, retries and error handling as :meth:`enhance` (data generation uses it for grid prompts,
        curation and captions). The client is opened on the first call and kept for the next ones (creating one
        costs ~0.3 s) until :meth:`close`. Raises :class:`EnhanceError` on any failure.
        """
        pngs = [_png_bytes(im.convert("RGB")) for im in images]
        if getattr(self, "_kept", None) is None:
            key = resolve_api_key(self._key_file)
            vertex = _env_flag("GOOGLE_GENAI_USE_VERTEXAI")
            if key is None and not vertex:
                raise EnhanceError(_NO_KEY)
            self._kept = (self._open(key, vertex), key)
        transport, key = self._kept
        return self._call(transport, text, pngs or None, step, key)

    def close(self) -> None:
        """Close the client :meth:`ask` keeps open (it is opened again when needed)."""
        kept, self._kept = getattr(self, "_kept", None), None
        if kept is not None:
            try:
                kept[0].close()
            except Exception:  # closing must never mask a result
                pass


def _plain_http(url: str | None) -> bool:
    """True for an ``http://`` URL whose host is not this machine (where a key would cross a network unencrypted)."""
    from urllib.parse import urlparse

    if not url or not url.lower().startswith("http://"):
        return False
    host = (urlparse(url).hostname or "").lower()
    return host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("127.")
