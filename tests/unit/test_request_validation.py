"""OpenAI request shapes (pydantic) and the router's request preparation: every bad field is a BadRequest
naming it; oversized prompts are refused before tokenizing; big ones are tokenized off the event loop;
client request ids are labels."""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest
from corral.router.server.core import RouterConfig, prepare_request
from corral.router.server.errors import BadRequest
from corral.router.server.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    check_sampling,
    parse,
)
from corral.router.tokenizer import ByteTokenizer
from corral.v1 import engine_pb2 as epb

OK = {"model": "m", "prompt": "hello"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"seed": -1}, "'seed'"),
        ({"seed": 1 << 63}, "'seed'"),
        ({"seed": "7"}, "'seed'"),
        ({"top_k": -2}, "'top_k'"),
        ({"top_k": 1 << 31}, "'top_k'"),
        ({"max_tokens": 1 << 32}, "'max_tokens'"),
        ({"max_completion_tokens": 0}, "'max_completion_tokens'"),
        ({"max_tokens": True}, "'max_tokens'"),
        ({"temperature": 2.01}, "'temperature'"),
        ({"temperature": float("inf")}, "'temperature'"),
        ({"top_p": 0.0}, "'top_p'"),
        ({"top_p": 1.01}, "'top_p'"),
        ({"n": 3}, "'n'"),
        ({"stop": [1]}, "'stop'"),
        ({"stream": "yes"}, "'stream'"),
        ({"prompt": [0, 1 << 32]}, "prompt[1]"),
        ({"prompt": [-1]}, "prompt[0]"),
        ({"prompt": []}, "'prompt'"),
        ({"prompt": [1] * ((1 << 20) + 1)}, "'prompt'"),
        ({"prompt": [[1, 2], [3]]}, "'prompt'"),
        ({"prompt": None}, "'prompt'"),
        ({"model": ""}, "'model'"),
        ({"model": 3}, "'model'"),
    ],
)
def test_completion_fields_are_checked(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest, match=r"field") as ei:
        parse(CompletionRequest, {**OK, **extra})
    assert field in ei.value.message


def test_completion_shapes_and_defaults() -> None:
    r = parse(CompletionRequest, {**OK, "best_of": 1, "logit_bias": {}, "user": "u"})  # unknown: ignored
    sp = r.sampling()
    assert sp.temperature == 1.0 and sp.top_p == 1.0 and sp.top_k == 0 and sp.seed == 0
    assert parse(CompletionRequest, {**OK, "prompt": ["one"]}).prompt == "one"
    assert parse(CompletionRequest, {**OK, "prompt": [1, 2]}).prompt == [1, 2]
    r = parse(CompletionRequest, {**OK, "max_tokens": 5, "max_completion_tokens": 7, "n": 1, "top_k": -1})
    assert r.new_tokens() == 7 and r.sampling().top_k == -1
    r = parse(CompletionRequest, {**OK, "temperature": 0, "seed": (1 << 63) - 1, "stream": True,
                                  "stream_options": {"include_usage": True}})  # fmt: skip
    assert r.sampling().temperature == 0.0 and r.sampling().seed == (1 << 63) - 1 and r.include_usage()
    with pytest.raises(BadRequest, match="missing required field 'prompt'"):
        parse(CompletionRequest, {"model": "m"})
    with pytest.raises(BadRequest, match="JSON object"):
        parse(CompletionRequest, [1])


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hi", "'messages'"),
        ([], "'messages'"),
        ([{"content": "x"}], "'messages[0].role'"),
        ([{"role": "user", "content": 3}], "'messages[0].content'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "'messages[0].content'"),
        ([{"role": "user", "content": ["hi"]}], "'messages[0].content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}],
         "'messages[1].content'"),
    ],
)  # fmt: skip
def test_chat_messages_are_checked(messages: Any, field: str) -> None:
    with pytest.raises(BadRequest) as ei:
        parse(ChatCompletionRequest, {"model": "m", "messages": messages})
    assert field in ei.value.message


def test_chat_text_parts_are_joined() -> None:
    r = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}], "tool_calls": []},
        {"role": "assistant", "content": None}]})  # fmt: skip
    assert [m.as_dict() for m in r.messages] == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


def test_grpc_sampling_limits() -> None:
    assert check_sampling(None).temperature == 1.0  # unset: OpenAI's defaults, not greedy
    assert check_sampling(epb.SamplingParams(temperature=0.0)).top_p == 1.0  # 0 = unset
    for sp, field in [
        (epb.SamplingParams(temperature=2.5), "sampling.temperature"),
        (epb.SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (epb.SamplingParams(top_p=-0.5), "sampling.top_p"),
        (epb.SamplingParams(top_k=-7), "sampling.top_k"),
        (epb.SamplingParams(seed=1 << 63), "sampling.seed"),
    ]:
        with pytest.raises(BadRequest, match=field):
            check_sampling(sp)


# ---- preparation over a stand-in router -----------------------------------------------------------------


class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__(4)
        self.calls: list[int] = []  # thread idents

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(threading.get_ident())
        return super().encode(text, add_special_tokens)


def _router(tok: CountingTokenizer, max_model_len: int) -> Any:
    """Just what request preparation uses of a Router (one base model 'm', no replicas connected)."""
    cfg = RouterConfig(tokenizers={"m": tok})
    return types.SimpleNamespace(
        config=cfg,
        resolve_model=lambda name, tenant=None: ("m", None, ""),
        max_model_len=lambda base: max_model_len,
        fleet=types.SimpleNamespace(candidates=lambda base: []),
        pool=types.SimpleNamespace(by_replica={}),
        now=lambda: 0.0,
        selection=types.SimpleNamespace(selects=lambda model: False),  # no spec.modelSelection
    )


async def test_oversized_prompt_is_refused_before_tokenizing() -> None:
    tok = CountingTokenizer()
    r = _router(tok, max_model_len=1000)  # at most 4 bytes a token: 4000 characters at most
    with pytest.raises(BadRequest, match="'prompt' is 4001 characters"):
        await prepare_request(r, "m", prompt="x" * 4001)
    with pytest.raises(BadRequest, match=r"field 'messages' \(all contents together\) is 5000 characters"):
        await prepare_request(r, "m", messages=[{"role": "user", "content": "x" * 5000}])
    assert tok.calls == []
    r.config.max_prompt_chars = 100  # the hard cap, when it is lower
    with pytest.raises(BadRequest, match="cap of 100"):
        await prepare_request(r, "m", prompt="x" * 101)
    assert tok.calls == []


async def test_big_prompts_are_tokenized_off_the_event_loop() -> None:
    tok = CountingTokenizer()
    r = _router(tok, max_model_len=100_000)
    loop_thread = threading.get_ident()
    await prepare_request(r, "m", prompt="small", max_tokens=1)
    big = await prepare_request(r, "m", prompt="y" * 200_000, max_tokens=1)
    assert big.rr.prompt_tokens == 50_000
    assert tok.calls[0] == loop_thread and tok.calls[1] != loop_thread


async def test_client_request_ids_are_labels() -> None:
    r = _router(CountingTokenizer(), max_model_len=0)
    a = await prepare_request(r, "m", prompt="p", client_request_id="dup")
    b = await prepare_request(r, "m", prompt="p", client_request_id="dup")
    assert a.client_request_id == b.client_request_id == "dup"
    assert a.rr.request_id != b.rr.request_id and "dup" not in (a.rr.request_id, b.rr.request_id)


async def test_token_ids_checked_against_the_models_vocabulary() -> None:
    small = ByteTokenizer(1)  # vocabulary of 256
    r = _router(CountingTokenizer(), max_model_len=0)
    r.config.tokenizers["m"] = small
    with pytest.raises(BadRequest, match=r"'prompt\[2\]'.*vocabulary"):
        await prepare_request(r, "m", token_ids=[1, 2, 256], ids_field="prompt")
    p = await prepare_request(r, "m", token_ids=[1, 2, 255], ids_field="prompt", max_tokens=3)
    assert p.token_ids == [1, 2, 255] and p.tokenizer is small and p.sampling is not None
