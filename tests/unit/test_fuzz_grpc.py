"""Hostile input to the router's gRPC front (``corral.v1.Router``), against a real router over sim engines
on 127.0.0.1: random bytes as a message, messages with random and out-of-range fields, odd metadata.

Every call ends OK or with a precise status (INVALID_ARGUMENT naming the field or the decode failure,
NOT_FOUND naming the model) — never INTERNAL / UNKNOWN — and nothing is left in flight after each batch.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from corral.router.server import limits
from corral.v1 import engine_pb2 as epb
from corral.v1 import router_pb2 as rpb
from corral.v1 import router_pb2_grpc as rpb_grpc
from fuzz_testkit import MODEL, Harness, fuzz_settings, harness, tried
from hypothesis import given
from hypothesis import strategies as st

__all__ = ["harness"]

METHODS = ["Generate", "GenerateStream", "ListModels", "Explain", "Feedback"]
PRECISE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def channel(harness: Harness) -> Any:
    ch = grpc.insecure_channel(harness.grpc_address)
    yield ch
    ch.close()


@pytest.fixture(autouse=True)
def _no_leak(harness: Harness) -> Any:
    yield
    harness.settle()
    assert "500" not in harness.request_codes(), harness.request_codes()


def call_raw(ch: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    path = f"/corral.v1.Router/{method}"
    ident = lambda b: b  # noqa: E731
    try:
        if method == "GenerateStream":
            list(
                ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)(data, timeout=20)
            )
        else:
            ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)(data, timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@fuzz_settings(100)
@given(st.binary(max_size=200), st.sampled_from(METHODS))
def test_random_bytes(harness: Harness, channel: grpc.Channel, data: bytes, method: str) -> None:
    tried("grpc: random bytes as a message")
    code, details = call_raw(channel, method, data)
    assert code in {grpc.StatusCode.OK} | PRECISE, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT and "decode" in details:
        assert "corral.v1." in details  # names the message type


u32 = st.one_of(st.integers(0, 16), st.integers(0, (1 << 32) - 1), st.sampled_from([0, 1, (1 << 32) - 1]))
floats = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 2.0, 2.0001, -1.0, 1.0, 1e30, float("nan")]),
)
sampling = st.builds(
    epb.SamplingParams,
    temperature=floats,
    top_p=floats,
    top_k=st.integers(-(1 << 31), (1 << 31) - 1),
    seed=st.integers(0, (1 << 64) - 1),
    stop=st.lists(st.text(max_size=5), max_size=20),
    ignore_eos=st.booleans(),
)
requests = st.builds(
    rpb.CompletionRequest,
    model=st.one_of(st.just(MODEL), st.text(max_size=12), st.just("m" * (limits.MAX_NAME_CHARS + 1))),
    prompt=st.text(max_size=30),
    prompt_token_ids=st.lists(u32, max_size=6),
    max_tokens=st.one_of(st.integers(0, 4), u32),
    sampling=st.one_of(st.none(), sampling),
    request_id=st.one_of(st.text(max_size=10), st.just("r" * (limits.MAX_NAME_CHARS + 1))),
)


@fuzz_settings(150)
@given(requests, st.booleans())
def test_out_of_range_fields(
    harness: Harness, channel: grpc.Channel, req: rpb.CompletionRequest, stream: bool
) -> None:
    tried("grpc: random / out-of-range CompletionRequest fields")
    if req.max_tokens > 8 and req.model == MODEL:
        req.max_tokens = 2 if req.max_tokens < 4000 else req.max_tokens  # over the length: refused anyway
    st_ = rpb_grpc.RouterStub(channel)
    try:
        if stream:
            list(st_.GenerateStream(req, timeout=20))
        else:
            st_.Generate(req, timeout=20)
    except grpc.RpcError as e:
        assert e.code() in PRECISE, (e.code(), e.details())
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert e.details()
        return


@fuzz_settings(60)
@given(
    st.one_of(st.none(), requests),
    st.text(max_size=20),
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
            st.from_regex(r"[ -~]{0,30}", fullmatch=True),
        ),
        max_size=3,
    ),
)
def test_explain_and_metadata(
    harness: Harness,
    channel: grpc.Channel,
    req: rpb.CompletionRequest | None,
    rid: str,
    md: list[tuple[str, str]],
) -> None:
    tried("grpc: Explain / ListModels with random requests and metadata")
    st_ = rpb_grpc.RouterStub(channel)
    md = [
        (k, v) for k, v in md if not k.startswith("grpc-") and k not in ("te", "content-type", "user-agent")
    ]
    ex = rpb.ExplainRequest(request=req) if req is not None else rpb.ExplainRequest(request_id=rid)
    for fn, arg in ((st_.Explain, ex), (st_.ListModels, rpb.ListModelsRequest())):
        try:
            fn(arg, metadata=md, timeout=20)
        except grpc.RpcError as e:
            assert e.code() in PRECISE | {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, (
                e.code(),
                e.details(),
            )


def test_long_names_fit_the_trailers(harness: Harness, channel: grpc.Channel) -> None:
    """A 100k-character model name is refused naming the field (it used to overflow the trailers and reach
    the client as RESOURCE_EXHAUSTED 'Stream removed')."""
    tried("grpc: limits", 2)
    st_ = rpb_grpc.RouterStub(channel)
    for field in ("model", "request_id"):
        kw = {"model": MODEL, "prompt": "x", field: "x" * 100_000}
        with pytest.raises(grpc.RpcError) as ei:
            st_.Generate(rpb.CompletionRequest(**kw), timeout=20)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"'{field}'" in ei.value.details()
