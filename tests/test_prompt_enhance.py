"""Tests of dsd_core.prompt against a real HTTP server on 127.0.0.1 (no SDK mocks).

The Gemini tests run the real google-genai SDK against ``fake_gemini.FakeGemini``.
The local-VLM tests build a tiny random Idefics3 (SmolVLM architecture) model
and processor offline and run the enhancer's real generate path on it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import time
import uuid
import warnings

import pytest
from PIL import Image

from fake_gemini import CAPTION_REPLY, ENHANCED_REPLY, FakeGemini, clean_env  # noqa: F401

from dsd_core.prompt import (
    CAPTION_INSTRUCTION,
    DEFAULT_GEMINI_MODEL,
    EnhanceResult,
    GeminiEnhancer,
    LocalVLMEnhancer,
    clean_reply,
    clear_memory_cache,
    enhance_prompt,
    prepare_reference,
)
from dsd_core.prompt import gemini as gemini_module

pytestmark = pytest.mark.usefixtures("clean_env")

PROMPT = "a photo of it on a sunny beach"
FAST = dict(timeout=2.0, retries=2, backoff=0.02)


def _image(size=(640, 480), color=(200, 80, 40)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.putpixel((size[0] // 2, size[1] // 2), (0, 255, 0))
    return img


def _key() -> str:
    return "AIzaFAKE-" + uuid.uuid4().hex


def _dsd_warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dsd_core")]


def _b64decode(data: str) -> bytes:
    """Decode standard or URL-safe base64 (the SDK sends the URL-safe alphabet)."""
    data = data.translate(str.maketrans("+/", "-_"))
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _parts(request):
    return request["body"]["contents"][0]["parts"]


# --------------------------------------------------------------------------- helpers (pure functions)

def test_socket_guard_blocks_non_loopback():
    import socket

    with pytest.raises(RuntimeError, match="tried to reach the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=0.1)  # TEST-NET-1, never reached
    with pytest.raises(RuntimeError, match="tried to reach the network"):
        socket.getaddrinfo("generativelanguage.googleapis.com", 443)


def test_clean_reply_deletes_newlines_and_quotes():
    assert clean_reply(CAPTION_REPLY) == (
        "A red fox with a white-tipped tail sitting on a mossy rock,soft morning light, eye-level shot"
    )
    assert clean_reply("\u201cA cat\u201d") == "A cat"
    assert clean_reply("'\"nested\"'") == "nested"
    assert clean_reply("it's fine") == "it's fine"
    assert clean_reply(None) == "" and clean_reply(" \n ") == ""


def test_prepare_reference_center_crops_to_512():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # the centre square is red
    ref = prepare_reference(img)
    assert ref.size == (512, 512) and ref.mode == "RGB"
    assert ref.getpixel((256, 256)) == (255, 0, 0) and ref.getpixel((5, 5)) == (255, 0, 0)


def test_backend_none_and_bad_backend():
    r = enhance_prompt(_image(), PROMPT, backend="none")
    assert r == EnhanceResult(prompt=PROMPT, enhanced=False, caption=None, backend="none")
    with pytest.raises(ValueError):
        enhance_prompt(_image(), PROMPT, backend="gpt")


# --------------------------------------------------------------------------- Gemini: success path

def test_success_two_calls_carry_image_and_instructions(monkeypatch):
    key = _key()
    monkeypatch.setenv("GEMINI_API_KEY", key)
    with FakeGemini("success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert result.enhanced and result.warning is None and not result.cached and result.backend == "gemini"
    assert result.prompt == clean_reply(ENHANCED_REPLY)
    assert result.caption == clean_reply(CAPTION_REPLY)
    assert "\n" not in result.prompt and not result.prompt.startswith('"')

    assert len(fake.requests) == 2
    first, second = fake.requests
    for req in fake.requests:
        assert req["path"].endswith(f"/models/{DEFAULT_GEMINI_MODEL}:generateContent")
        assert req["headers"]["x-goog-api-key"] == key
    # call 1: the caption instruction plus the 512² reference image, inline.
    texts = [p["text"] for p in _parts(first) if "text" in p]
    assert texts == [CAPTION_INSTRUCTION]
    inline = [p.get("inlineData") or p.get("inline_data") for p in _parts(first)]
    inline = [d for d in inline if d]
    assert len(inline) == 1
    mime = inline[0].get("mimeType") or inline[0].get("mime_type")
    assert mime in ("image/png", "image/jpeg")
    sent = Image.open(io.BytesIO(_b64decode(inline[0]["data"])))
    assert sent.size == (512, 512)
    # call 2: text only, carrying the user prompt and the cleaned caption.
    assert all("inlineData" not in p and "inline_data" not in p for p in _parts(second))
    text2 = " ".join(p["text"] for p in _parts(second))
    assert PROMPT in text2 and clean_reply(CAPTION_REPLY) in text2


def test_model_and_base_url_from_env(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", _key())
    monkeypatch.setenv("DSD_GEMINI_MODEL", "gemini-test-env")
    with FakeGemini("success") as fake:
        monkeypatch.setenv("DSD_GEMINI_BASE_URL", fake.base_url)
        assert enhance_prompt(_image(), PROMPT, **FAST).enhanced
        assert enhance_prompt(_image(), PROMPT, model="gemini-explicit", **FAST).enhanced
    paths = [r["path"] for r in fake.requests]
    assert len(paths) == 4
    assert all(":generateContent" in p for p in paths)
    assert "/models/gemini-test-env:" in paths[0] and "/models/gemini-explicit:" in paths[2]


def test_key_file_from_env_and_argument(monkeypatch, tmp_path):
    env_key, arg_key = _key(), _key()
    (tmp_path / "env.key").write_text(env_key + "\n")
    (tmp_path / "arg.key").write_text(arg_key)
    monkeypatch.setenv("DSD_GEMINI_KEY_FILE", str(tmp_path / "env.key"))
    with FakeGemini("success") as fake:
        assert enhance_prompt(_image(), PROMPT, base_url=fake.base_url, use_cache=False, **FAST).enhanced
        assert enhance_prompt(_image(), PROMPT, base_url=fake.base_url, use_cache=False,
                              key_file=tmp_path / "arg.key", **FAST).enhanced
    assert [r["headers"]["x-goog-api-key"] for r in fake.requests] == [env_key] * 2 + [arg_key] * 2


# --------------------------------------------------------------------------- Gemini: fallbacks

@pytest.mark.parametrize(
    "scenario, requests, cause",
    [
        ("500", 3, "server error (HTTP 500"),
        ("400", 1, "request rejected (HTTP 400"),
        ("malformed", 1, "malformed"),
        ("empty", 1, "no candidates"),
        ("blocked", 1, "blocked the request (reason SAFETY)"),
        ("slow", 3, "timed out"),
    ],
)
def test_failure_scenarios_fall_back_with_one_warning(monkeypatch, caplog, scenario, requests, cause):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    with FakeGemini(scenario, delay=5.0) as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=0.3, retries=2, backoff=0.02)
    elapsed = time.monotonic() - start
    assert result.prompt == PROMPT and not result.enhanced and result.caption is None and not result.cached
    assert result.warning and cause in result.warning and "caption step" in result.warning
    assert result.warning.startswith("Prompt enhancement (gemini) fell back to the original prompt: ")
    assert fake.request_count == requests
    logged = _dsd_warnings(caplog)
    assert len(logged) == 1 and logged[0].getMessage() == result.warning
    assert elapsed < 3.0, f"{scenario} took {elapsed:.1f} s"


def test_429_then_success_retries_with_backoff(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(gemini_module.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    with FakeGemini("429-then-success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=2.0, retries=2, backoff=0.05)
    assert result.enhanced and result.prompt == clean_reply(ENHANCED_REPLY)
    assert fake.request_count == 3  # 429, then caption, then enhance
    assert sleeps == [0.05]


def test_backoff_is_exponential_and_bounded(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    sleeps = []
    monkeypatch.setattr(gemini_module.time, "sleep", sleeps.append)
    with FakeGemini("500") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=2.0, retries=4,
                                backoff=0.1, max_backoff=0.3)
    assert not result.enhanced and "after 5 attempts" in result.warning
    assert fake.request_count == 5
    assert sleeps == [0.1, 0.2, 0.3, 0.3]


def test_failure_in_second_call_falls_back(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    with FakeGemini("success", enhanced="\n  \n") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert not result.enhanced and result.prompt == PROMPT
    assert "empty reply in the enhance step" in result.warning
    assert fake.request_count == 2


def test_no_key_makes_no_request(caplog):
    with FakeGemini("success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert fake.request_count == 0
    assert not result.enhanced and result.prompt == PROMPT
    assert "no Gemini API key found" in result.warning
    assert len(_dsd_warnings(caplog)) == 1


def test_unreadable_key_file_makes_no_request(monkeypatch, tmp_path):
    monkeypatch.setenv("DSD_GEMINI_KEY_FILE", str(tmp_path / "missing.key"))
    with FakeGemini("success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert fake.request_count == 0 and not result.enhanced
    assert "DSD_GEMINI_KEY_FILE could not be read" in result.warning


def test_sdk_missing_falls_back(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    monkeypatch.setitem(sys.modules, "google.genai", None)  # makes "from google import genai" fail
    monkeypatch.setitem(sys.modules, "google.generativeai", None)
    with FakeGemini("success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert fake.request_count == 0 and not result.enhanced
    assert "google-genai package is not installed" in result.warning


@pytest.mark.parametrize("scenario, enhanced", [("success", True), ("429-then-success", True), ("500", False)])
def test_legacy_sdk_when_google_genai_is_absent(monkeypatch, scenario, enhanced):
    """The deprecated google-generativeai package is used only when google-genai is missing (if installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("google.generativeai")
    key = _key()
    monkeypatch.setenv("GEMINI_API_KEY", key)
    monkeypatch.setitem(sys.modules, "google.genai", None)
    with FakeGemini(scenario) as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=2.0, retries=1, backoff=0.01)
    assert result.enhanced == enhanced
    assert fake.requests and all(r["headers"].get("x-goog-api-key") == key for r in fake.requests)
    assert result.warning is None if enhanced else key not in result.warning


def test_vertex_without_credentials_falls_back(monkeypatch, tmp_path, caplog):
    """Vertex AI mode authenticates with ADC; missing credentials fail before any connection is made."""
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "dsd-test-project")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "us-central1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-credentials.json"))
    result = enhance_prompt(_image(), PROMPT, **FAST)
    assert not result.enhanced and result.prompt == PROMPT
    assert "credentials unavailable (DefaultCredentialsError" in result.warning  # not the guard's RuntimeError
    assert len(_dsd_warnings(caplog)) == 1


# --------------------------------------------------------------------------- cache

def test_cache_hit_avoids_requests(monkeypatch, clean_env):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    img = _image()
    with FakeGemini("success") as fake:
        first = enhance_prompt(img, PROMPT, base_url=fake.base_url, **FAST)
        assert fake.request_count == 2
        second = enhance_prompt(img.copy(), PROMPT, base_url=fake.base_url, **FAST)
        assert fake.request_count == 2 and second.cached and second.enhanced
        assert (second.prompt, second.caption) == (first.prompt, first.caption)
        clear_memory_cache()  # the disk cache alone must be enough
        third = enhance_prompt(img, PROMPT, base_url=fake.base_url, **FAST)
        assert fake.request_count == 2 and third.cached and third.prompt == first.prompt
        # anything that changes the key is a miss
        enhance_prompt(img, PROMPT + "!", base_url=fake.base_url, **FAST)
        assert fake.request_count == 4
        enhance_prompt(img, PROMPT, base_url=fake.base_url, model="gemini-other", **FAST)
        assert fake.request_count == 6
        enhance_prompt(_image(color=(1, 2, 3)), PROMPT, base_url=fake.base_url, **FAST)
        assert fake.request_count == 8
        enhance_prompt(img, PROMPT, base_url=fake.base_url, use_cache=False, **FAST)
        assert fake.request_count == 10
    files = list((clean_env / "cache" / "prompt").glob("*.json"))
    assert len(files) == 4
    record = json.loads(files[0].read_text())
    assert {"enhanced", "caption", "prompt", "model", "backend", "instructions_version"} <= set(record)
    assert not list((clean_env / "cache" / "prompt").glob(".tmp-*"))


def test_failures_are_not_cached(monkeypatch, clean_env):
    monkeypatch.setenv("GEMINI_API_KEY", _key())
    with FakeGemini("500") as fake:
        assert not enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=2, retries=0).enhanced
    with FakeGemini("success") as fake:
        result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, **FAST)
    assert result.enhanced and not result.cached and fake.request_count == 2


# --------------------------------------------------------------------------- secrets

@pytest.mark.parametrize("scenario", ["success", "slow", "429-then-success", "500", "400", "malformed", "empty",
                                      "blocked", "cached", "connection-refused", "bad-key-file"])
def test_key_never_leaks(monkeypatch, caplog, capsys, clean_env, tmp_path, scenario):
    key = _key()
    monkeypatch.setenv("GEMINI_API_KEY", key)
    caplog.set_level(logging.DEBUG)  # root logger: also captures google_genai, httpx, httpcore
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if scenario == "connection-refused":
            with FakeGemini("success") as fake:
                url = fake.base_url  # the port is closed once the server stops
            result = enhance_prompt(_image(), PROMPT, base_url=url, timeout=0.5, retries=1, backoff=0.01)
            assert "endpoint unreachable" in result.warning
        elif scenario == "bad-key-file":
            bad = tmp_path / f"{key}.key"  # even a path that contains the key is not echoed...
            monkeypatch.delenv("GEMINI_API_KEY")
            result = enhance_prompt(_image(), PROMPT, key_file=bad, timeout=0.5)
            assert not result.enhanced
        else:
            with FakeGemini("success" if scenario == "cached" else scenario, delay=5.0) as fake:
                result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=0.3, retries=1,
                                        backoff=0.01)
                if scenario == "cached":
                    result = enhance_prompt(_image(), PROMPT, base_url=fake.base_url, timeout=0.3)
                    assert result.cached
        seen.append(repr(result))
        seen.append(repr(GeminiEnhancer(base_url="http://127.0.0.1:1", key_file=None)))
        seen.append(repr(gemini_module.resolve_api_key()) if scenario != "bad-key-file" else "")
    seen += [r.getMessage() for r in caplog.records]
    seen += [str(r.exc_info) for r in caplog.records if r.exc_info]
    seen += [str(w.message) for w in caught]
    out = capsys.readouterr()
    seen += [out.out, out.err]
    cache_dir = clean_env / "cache"
    seen += [p.read_text() for p in cache_dir.rglob("*") if p.is_file()]
    text = "\n".join(seen)
    assert caplog.records, "logging was not captured"
    assert key not in text


def test_secret_wrapper_hides_value():
    secret = gemini_module._Secret("AIzaHIDDEN")
    assert "AIzaHIDDEN" not in repr(secret) and "AIzaHIDDEN" not in str(secret) and "AIzaHIDDEN" not in f"{secret}"
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(secret)


# --------------------------------------------------------------------------- local VLM (tiny Idefics3)

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """Build a tiny random Idefics3 (SmolVLM) model + processor offline and save it to a folder."""
    import torch
    from transformers import GenerationConfig, GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration
    from transformers import Idefics3Processor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: i for i, b in enumerate(range(256))}
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                              pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                              additional_special_tokens=specials[1:])
    # The chat template of the SmolVLM instruct models.
    template = (
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    # vision: 32 px tiles, 8 px patches -> 16 patches, pixel-shuffle scale 2 -> 4 image tokens per tile
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=template)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=2048, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **ids,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    # Random weights emit arbitrary bytes; allow only ASCII letters so that the reply is never empty
    # and every new token is exactly one character (EOS is suppressed too: replies use all tokens).
    letters = {tokenizer.convert_tokens_to_ids(byte_chars[ord(c)]) for c in "abcdefghijklmnopqrstuvwxyz"}
    model.generation_config = GenerationConfig(
        suppress_tokens=[i for i in range(len(tokenizer)) if i not in letters], **ids
    )
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, tokenizer


def test_local_vlm_runs_real_generate_path(tiny_vlm, caplog):
    folder, tokenizer = tiny_vlm
    start = time.monotonic()
    result = enhance_prompt(_image(), PROMPT, backend="local", local_model_path=str(folder),
                            max_new_tokens=MAX_NEW)
    assert time.monotonic() - start < 20
    assert result.enhanced and result.backend == "local" and result.warning is None, result.warning
    for text in (result.prompt, result.caption):
        assert isinstance(text, str) and text and "\n" not in text and "\r" not in text
        assert 0 < len(tokenizer(text)["input_ids"]) <= MAX_NEW
    assert not _dsd_warnings(caplog)
    again = enhance_prompt(_image(), PROMPT, backend="local", local_model_path=str(folder), max_new_tokens=MAX_NEW)
    assert again.cached and again.prompt == result.prompt


def test_local_vlm_keep_loaded(tiny_vlm):
    from dsd_core.prompt import unload_local_models

    folder, _ = tiny_vlm
    enhancer = LocalVLMEnhancer(folder, max_new_tokens=4, keep_loaded=True)
    try:
        first = enhancer.enhance(_image(), PROMPT)
        assert enhancer.enhance(_image(), PROMPT) == first  # greedy decoding is deterministic
    finally:
        unload_local_models()


def test_local_vlm_missing_folder_falls_back(tmp_path, caplog):
    result = enhance_prompt(_image(), PROMPT, backend="local", local_model_path=str(tmp_path / "nope"))
    assert not result.enhanced and result.prompt == PROMPT
    assert "local VLM folder was not found" in result.warning
    assert len(_dsd_warnings(caplog)) == 1
    result = enhance_prompt(_image(), PROMPT, backend="local")
    assert "no local VLM folder given" in result.warning


def test_local_vlm_broken_folder_falls_back(tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    result = enhance_prompt(_image(), PROMPT, backend="local", local_model_path=str(broken))
    assert not result.enhanced and result.prompt == PROMPT
    assert "could not be loaded" in result.warning
    assert len(_dsd_warnings(caplog)) == 1
