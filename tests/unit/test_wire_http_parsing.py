"""HTTP front helpers: API-key extraction, chat template, sampling field validation, Prometheus rendering."""

from __future__ import annotations

import pytest
from corral.router.server.errors import BadRequest, NotFound
from corral.router.server.http_api import api_key_of, chat_prompt
from corral.router.server.metrics import Hist
from corral.router.server.openai_models import CompletionRequest, parse


def test_api_key_headers() -> None:
    assert api_key_of({"Authorization": "Bearer sk-1"}) == "sk-1"
    assert api_key_of({"Authorization": "sk-2"}) == "sk-2"
    assert api_key_of({"x-api-key": "sk-3"}) == "sk-3"
    assert api_key_of({}) is None


def test_chat_prompt_and_errors() -> None:
    p = chat_prompt(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"text": "hi"}]}]
    )
    assert p == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    for bad in ("hi", [], [{"content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(BadRequest, match="messages"):
            chat_prompt(bad)


def test_sampling_fields() -> None:
    def sampling(**kw: object) -> object:
        return parse(CompletionRequest, {"model": "m", "prompt": "x", **kw}).sampling()

    default = sampling()
    assert default.temperature == 1.0 and default.top_p == 1.0  # OpenAI's defaults, not greedy
    sp = sampling(temperature=0.5, stop="\n", seed=3)
    assert sp.temperature == 0.5 and list(sp.stop) == ["\n"] and sp.seed == 3
    with pytest.raises(BadRequest, match="'temperature'"):
        sampling(temperature="hot")
    with pytest.raises(BadRequest, match="'stop'"):
        sampling(stop=[1])


def test_error_bodies() -> None:
    e = NotFound("model 'x' not found; available: a")
    assert e.body() == {
        "error": {
            "message": "model 'x' not found; available: a",
            "type": "not_found_error",
            "param": None,
            "code": 404,
        }
    }
    assert BadRequest("field 'temperature' must be <= 2 (got 5)").body()["error"]["param"] == "temperature"


def test_hist_buckets_cumulate() -> None:
    h = Hist((0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 5.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 1.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert h.sum == pytest.approx(6.25)
