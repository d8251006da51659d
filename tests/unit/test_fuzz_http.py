"""Hostile input to the OpenAI HTTP front: property tests (hypothesis) on the request parser in-process and
against a real router over sim engines on 127.0.0.1 (raw sockets, so anything can be sent).

Every input gets a precise 4xx (an OpenAI-shaped JSON error; a field-level problem names the field in
``param``), a 200, or (for what aiohttp's HTTP parser refuses) a plain 400 — never a 500, and after each
batch nothing is left in flight in the router. The server limits of :mod:`corral.router.server.limits`
(413, 408, nesting, header sizes) are each checked at their edge.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import urllib.parse
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from corral.router.server import limits
from corral.router.server.errors import BadRequest
from corral.router.server.openai_models import ChatCompletionRequest, CompletionRequest, parse
from fuzz_testkit import (
    ADAPTER,
    MODEL,
    Harness,
    fuzz_settings,
    harness,
    http_request,
    raw_http,
    tried,
)
from hypothesis import given
from hypothesis import strategies as st

__all__ = ["harness"]  # the module-scoped fixture

# ---- strategies --------------------------------------------------------------------------------------
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
weird_numbers = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from([0, -1, 1 << 31, 1 << 32, (1 << 63), (1 << 64), 2**53 + 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([-0.0, 1e-320, 1e308, 2.0000001, -2.0000001, 20.5]),
)
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "ignore_eos", "n", "stream", "stream_options", "user", "logprobs", "top_logprobs",
    "presence_penalty", "frequency_penalty", "best_of", "echo", "logit_bias",
]  # fmt: skip
SMALL_OK = {"max_tokens": 2}


def small(body: dict[str, Any]) -> dict[str, Any]:
    """Keep generations that pass validation short (the fuzz is about parsing, not generating)."""
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 8 < v < 1 << 32:
            body[k] = 2
    body.setdefault("max_tokens", 2)
    return body


def base_body(chat: bool) -> dict[str, Any]:
    if chat:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **SMALL_OK}
    return {"model": MODEL, "prompt": "hello", **SMALL_OK}


mutated_body = st.tuples(
    st.booleans(),
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(json_value, weird_numbers), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=10), json_value, max_size=2),  # unknown fields
)


def check_error_body(status: int, payload: Any) -> None:
    """An OpenAI-shaped error: message, type, code = the status; ``param`` matches a named field."""
    err = payload["error"]
    assert isinstance(err["message"], str) and err["message"], payload
    assert err["code"] == status, payload
    if "field '" in err["message"]:
        assert err["param"], payload


# ---- in-process: the parser --------------------------------------------------------------------------
@fuzz_settings(400)
@given(mutated_body)
def test_parser_accepts_or_names_the_field(case: tuple[bool, dict[str, Any], dict[str, Any]]) -> None:
    chat, changes, unknown = case
    tried("http parser (in-process)")
    body = {**base_body(chat), **unknown, **changes}
    cls = ChatCompletionRequest if chat else CompletionRequest
    try:
        req = parse(cls, body)
    except BadRequest as e:
        assert e.http_status == 400
        assert "field '" in e.message or "request body" in e.message, e.message
        assert e.param is None or e.param.split(".")[0].split("[")[0] in body, (e.param, body)
        return
    # accepted: every accepted number is within the engines' ranges
    nt = req.new_tokens()
    assert nt is None or 1 <= nt < 1 << 32
    sp = req.sampling()
    assert math.isfinite(sp.temperature) and 0.0 <= sp.temperature <= 2.0
    assert 0.0 < sp.top_p <= 1.0
    assert 0 <= sp.seed < 1 << 63


@fuzz_settings(200)
@given(json_value)
def test_parser_refuses_any_non_object(value: Any) -> None:
    tried("http parser (in-process)")
    for cls in (CompletionRequest, ChatCompletionRequest):
        try:
            parse(cls, value)
        except BadRequest:
            continue
        raise AssertionError(f"accepted {value!r}")


# ---- a real router ------------------------------------------------------------------------------------
OK_STATUSES = {200, 400, 404, 413}


def send_json(h: Harness, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    r = raw_http(h.http_port, http_request(path, body, headers))
    assert r is not None, "the router closed the connection without a response"
    assert r.status != 500 and r.status in OK_STATUSES, (r.status, r.body[:300])
    if r.status == 200:
        return r.status, r.body
    check_error_body(r.status, r.json())
    return r.status, r.json()


@pytest.fixture(autouse=True)
def _no_leak(harness: Harness) -> Any:
    """After each test (a batch of inputs): nothing in flight, and no request was a 500."""
    yield
    harness.settle()
    assert "500" not in harness.request_codes(), harness.request_codes()


@fuzz_settings(150)
@given(mutated_body, st.booleans())
def test_server_mutated_requests(
    harness: Harness, case: tuple[bool, dict[str, Any], dict[str, Any]], stream: bool
) -> None:
    chat, changes, unknown = case
    tried("http server: mutated OpenAI requests")
    body = small({**base_body(chat), **unknown, **changes})
    if stream and "stream" not in changes:
        body["stream"] = True
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, payload = send_json(harness, path, json.dumps(body).encode())
    if status == 400 and any(k in changes for k in ("max_tokens", "temperature", "top_p", "seed", "n")):
        assert payload["error"]["type"] == "invalid_request_error"


@fuzz_settings(150)
@given(st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v).encode()))
def test_server_random_bodies(harness: Harness, body: bytes) -> None:
    tried("http server: random bodies")
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, payload = send_json(harness, path, body)
        assert status == 400, (status, payload)


@fuzz_settings(100)
@given(
    st.sampled_from(
        [
            "application/json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "",
            "application/x-www-form-urlencoded",
            "image/png",
            "application/json; charset=latin-1",
        ]
    ),
    st.text(max_size=40).filter(lambda s: "\r" not in s and "\n" not in s),
    st.sampled_from(["x-request-id", "authorization", "x-api-key", "accept", "user-agent", "x-corral-x"]),
)
def test_server_headers(harness: Harness, ctype: str, value: str, header: str) -> None:
    """Any content type (the body is read as JSON whatever it says) and any header value: no 500."""
    tried("http server: content types and headers")
    r = raw_http(
        harness.http_port,
        http_request(
            "/v1/completions",
            orjson.dumps({"model": MODEL, "prompt": "x", **SMALL_OK}),
            {"Content-Type": ctype, header: value},
        ),
    )
    assert r is not None and r.status in (200, 400), r
    if r.status == 400 and r.body.startswith(b"{"):
        check_error_body(400, r.json())


@pytest.fixture(scope="module")
def impatient() -> Iterator[Harness]:
    """A router with 1 s header and body timeouts: junk that looks like the start of a request (b"\\r")
    is waited on until the header timeout (75 s as shipped)."""
    h = Harness(http_kw={"header_timeout_s": 1.0, "body_timeout_s": 1.0}).start()
    try:
        yield h
    finally:
        h.stop()


@fuzz_settings(60)
@given(st.binary(min_size=1, max_size=200))
def test_server_garbage_http(impatient: Harness, junk: bytes) -> None:
    """Bytes that are not HTTP at all, or a request line and headers with junk: a 4xx, or a clean close
    (at the latest when the header timeout passes)."""
    tried("http server: non-HTTP bytes")
    for data in (junk + b"\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n" + junk + b"\r\n\r\n"):
        r = raw_http(impatient.http_port, data, timeout=20)
        assert r is None or r.status < 500, r


# ---- the limits, each at its edge --------------------------------------------------------------------
def test_body_over_the_limit_is_413(harness: Harness) -> None:
    tried("http server: limits")
    big = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"a" * limits.HTTP_MAX_BODY_BYTES + b'"}'
    status, payload = send_json(harness, "/v1/completions", big)
    assert status == 413 and str(limits.HTTP_MAX_BODY_BYTES) in payload["error"]["message"]
    # compressed small, decompressed over the limit: the limit is on what the router would parse
    bomb = gzip.compress(big, compresslevel=1)
    status, payload = send_json(harness, "/v1/completions", bomb, {"Content-Encoding": "gzip"})
    assert status == 413


def test_nesting_and_encoding(harness: Harness) -> None:
    tried("http server: limits", 6)
    d = limits.JSON_MAX_DEPTH
    status, payload = send_json(harness, "/v1/completions", b"[" * (d + 1) + b"]" * (d + 1))
    assert status == 400 and "depth" in payload["error"]["message"]
    inside = b'{"model": "%s", "prompt": "x", "max_tokens": 2, "x": %s}' % (
        MODEL.encode(),
        b"[" * (d - 1) + b"]" * (d - 1),
    )
    assert send_json(harness, "/v1/completions", inside)[0] == 200  # deep but within the limit, unknown
    status, payload = send_json(harness, "/v1/completions", b'{"model": "\xff\xfe", "prompt": "x"}')
    assert status == 400 and "UTF-8" in payload["error"]["message"]
    status, payload = send_json(harness, "/v1/completions", b'{"model": "m", "prompt": "\\ud800"}')
    assert status == 400 and "surrogate" in payload["error"]["message"]
    status, payload = send_json(harness, "/v1/completions", b"not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "unreadable request body" in payload["error"]["message"]
    status, payload = send_json(
        harness, "/v1/completions", b'{"model": "m", "prompt": "x", "temperature": 1e999}'
    )
    assert status == 400 and "malformed JSON" in payload["error"]["message"]


def test_header_limits(harness: Harness) -> None:
    tried("http server: limits", 3)
    ok = orjson.dumps({"model": MODEL, "prompt": "x", **SMALL_OK})
    for extra in (
        {"X-Big": "a" * (limits.HTTP_MAX_LINE_BYTES + 1)},
        {f"X-H{i}": "a" for i in range(limits.HTTP_MAX_HEADERS + 1)},
        {"Content-Length": "-5"},
    ):
        r = raw_http(harness.http_port, http_request("/v1/completions", ok, extra))
        assert r is not None and r.status == 400, r


def test_adapter_and_model_names(harness: Harness) -> None:
    """Unknown model: 404 naming it; an over-long name: 400 naming the field (both fronts' limit)."""
    tried("http server: limits", 3)
    status, payload = send_json(harness, "/v1/completions", orjson.dumps({"model": "nope", "prompt": "x"}))
    assert status == 404 and "nope" in payload["error"]["message"]
    long = "m" * (limits.MAX_NAME_CHARS + 1)
    status, payload = send_json(harness, "/v1/completions", orjson.dumps({"model": long, "prompt": "x"}))
    assert status == 400 and payload["error"]["param"] == "model"
    body = orjson.dumps({"model": ADAPTER, "prompt": "x", **SMALL_OK})
    assert send_json(harness, "/v1/completions", body)[0] in (200, 404)


def test_refused_http_is_one_quiet_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """What aiohttp's parser refuses is logged as one INFO line each, without a traceback: a client sending
    garbage cannot flood the router's logs with ERRORs."""
    tried("http server: limits", 10)
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    for i in range(10):
        r = raw_http(harness.http_port, b"POST /v1/completions HTTP/1.1\r\nBad Header%d: x\r\n\r\n" % i)
        assert r is not None and r.status == 400
    mine = [rec for rec in caplog.records if rec.name == "aiohttp.server"]
    assert len(mine) >= 10
    assert all(rec.levelno == logging.INFO and not rec.exc_info for rec in mine), [
        (rec.levelname, rec.getMessage()) for rec in mine
    ]
    assert "refused a malformed HTTP request" in mine[0].getMessage()


roles = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), json_value
)
content = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10) | json_value}),
            st.dictionaries(st.sampled_from(["type", "text", "image_url"]), json_value, max_size=3),
            json_value,
        ),
        max_size=3,
    ),
    json_value,
)
message = st.one_of(
    st.fixed_dictionaries(
        {"role": roles, "content": content}, optional={"name": json_value, "x": json_value}
    ),
    json_value,
)


@fuzz_settings(100)
@given(st.lists(message, max_size=4), st.booleans())
def test_chat_messages(harness: Harness, messages: list[Any], stream: bool) -> None:
    """Random chat messages (roles, content strings / parts / anything): 200 or a 400 naming the field."""
    tried("http server: random chat messages")
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "stream": stream}
    try:
        parse(ChatCompletionRequest, body)
        parsed_ok = True
    except BadRequest as e:
        parsed_ok = False
        assert e.param is not None and e.param.startswith("messages"), e.message
    status, payload = send_json(harness, "/v1/chat/completions", json.dumps(body).encode())
    assert (status == 200) == parsed_ok or (status == 400 and "messages" in payload["error"]["message"]), (
        status,
        payload,
    )


@fuzz_settings(60)
@given(json_value, st.text(max_size=40))
def test_feedback_and_explain_endpoints(harness: Harness, body: Any, rid: str) -> None:
    """``POST /v1/feedback`` with any JSON, ``GET /v1/explain/{id}`` with any id: a 4xx naming the cause."""
    tried("http server: feedback / explain with random input", 2)
    r = raw_http(harness.http_port, http_request("/v1/feedback", json.dumps(body).encode()))
    assert r is not None and r.status in (400, 404, 409), r
    check_error_body(r.status, r.json())
    path = "/v1/explain/" + (urllib.parse.quote(rid, safe="") or "x")
    r = raw_http(harness.http_port, http_request(path, b"", method="GET"))
    assert r is not None and r.status in (200, 404), r
    if r.status == 404:
        check_error_body(404, r.json())
