"""OpenAI-backend helpers without I/O: /metrics (vLLM names, old and SGLang names), /v1/models, the
completions body sent to a backend, HTTP error -> gRPC code mapping, adapter sources, backend URLs."""

from __future__ import annotations

import grpc
import pytest
from corral.router.backends.discovery import normalize_url
from corral.router.backends.openai_http import error_message, lora_path, request_body, status_code
from corral.router.backends.pool import replica_id_of, split_spec
from corral.router.backends.scrape import parse_metrics, parse_models
from corral.v1 import engine_pb2 as epb
from hypothesis import given
from hypothesis import strategies as st

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.5
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="27000",enable_prefix_caching="True"} 1.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 1234.0
"""


def test_vllm_metrics_sum_over_engines_max_usage_and_kv_geometry() -> None:
    s = parse_metrics(VLLM)
    assert (s.running, s.waiting, s.kv_usage, s.found) == (5, 8, 0.5, True)
    assert (s.block_size, s.num_gpu_blocks) == (16, 27000)


def test_old_vllm_and_sglang_names_and_no_load_metrics() -> None:
    old = "vllm:num_requests_running 1\nvllm:num_requests_waiting 2\nvllm:gpu_cache_usage_perc 0.75\n"
    s = parse_metrics(old)
    assert (s.running, s.waiting, s.kv_usage) == (1, 2, 0.75)
    sg = 'sglang:num_running_reqs{model_name="m"} 4\nsglang:num_queue_reqs 6\nsglang:token_usage 0.1\n'
    s = parse_metrics(sg)
    assert (s.running, s.waiting, s.kv_usage) == (4, 6, 0.1)
    assert not parse_metrics("process_cpu_seconds_total 3\n").found


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=1, max_size=8))
def test_running_and_waiting_are_summed_over_series(series: list[tuple[int, int]]) -> None:
    text = "".join(
        f'vllm:num_requests_running{{engine="{i}"}} {r}\nvllm:num_requests_waiting{{engine="{i}"}} {w}\n'
        for i, (r, w) in enumerate(series)
    )
    s = parse_metrics(text)
    assert (s.running, s.waiting) == (sum(r for r, _ in series), sum(w for _, w in series))


def test_models_base_and_loaded_adapters() -> None:
    m = parse_models({"object": "list", "data": [
        {"id": "llama", "root": "/models/llama", "parent": None, "max_model_len": 8192},
        {"id": "sql", "root": "/adapters/sql", "parent": "llama"},
        {"id": "other", "root": "x", "parent": "not-this-base"},
    ]})  # fmt: skip
    assert (m.base, m.max_model_len, m.adapters) == ("llama", 8192, {"sql": "/adapters/sql"})
    with pytest.raises(ValueError, match="no base model"):
        parse_models({"data": []})


def test_completions_body_for_text_ids_adapter_and_sampling() -> None:
    sp = epb.SamplingParams(temperature=0.5, top_p=0.9, seed=3, stop=["\n"])
    req = epb.GenerateRequest(model="llama", prompt="hi", prompt_token_ids=[1, 2], max_tokens=5, sampling=sp)
    b = request_body(req)
    assert b["model"] == "llama" and b["prompt"] == "hi" and b["max_tokens"] == 5 and b["stream"] is True
    assert b["stream_options"] == {"include_usage": True}
    assert (b["temperature"], round(b["top_p"], 3), b["seed"], b["stop"]) == (0.5, 0.9, 3, ["\n"])
    assert "top_k" not in b and "ignore_eos" not in b
    ids = request_body(
        epb.GenerateRequest(model="llama", adapter="sql", prompt_token_ids=[7, 8], max_tokens=1)
    )
    assert ids["model"] == "sql" and ids["prompt"] == [7, 8] and "temperature" not in ids


def test_error_mapping_messages_and_sources() -> None:
    assert status_code(400) == status_code(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(404) == grpc.StatusCode.NOT_FOUND
    assert {status_code(s) for s in (429, 500, 502, 503, 401)} == {grpc.StatusCode.UNAVAILABLE}
    assert error_message(b'{"error": {"message": "bad max_tokens", "code": 400}}', 400) == "bad max_tokens"
    assert error_message(b'{"detail": "Not Found"}', 404) == "Not Found"
    assert error_message(b"upstream boom", 502) == "upstream boom"
    assert error_message(b"", 503) == "HTTP 503"
    assert lora_path("file:///a/b") == "/a/b" and lora_path("hf://org/repo") == "org/repo"
    assert lora_path("s3://bucket/x") == "s3://bucket/x"


def test_backend_urls_and_classes() -> None:
    assert normalize_url("10.0.0.5:8000/") == "http://10.0.0.5:8000"
    assert normalize_url("A100-80GB=10.0.0.5:8000") == "A100-80GB=http://10.0.0.5:8000"
    assert normalize_url("https://x.example/v=1") == "https://x.example/v=1"
    assert split_spec("L4=http://h:1", "H100") == ("L4", "http://h:1")
    assert split_spec("http://h:1/", "H100") == ("H100", "http://h:1")
    assert replica_id_of("http://10.0.0.5:8000") == "10.0.0.5:8000"
