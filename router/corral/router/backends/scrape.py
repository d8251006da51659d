"""Reading an OpenAI-compatible server's ``/metrics`` (vLLM's metric names) and ``/v1/models``.

Load: ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (summed over engines / DP ranks),
``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` on vLLM before 0.10; SGLang's
``sglang:num_running_reqs`` / ``sglang:num_queue_reqs`` / ``sglang:token_usage`` are read too), the max over
series. KV geometry: ``vllm:cache_config_info``'s ``block_size`` and ``num_gpu_blocks`` labels. Adapters:
``/v1/models`` entries whose ``parent`` is the base model (vLLM lists loaded LoRA adapters that way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


@dataclass(slots=True)
class Scraped:
    """One ``/metrics`` scrape. ``found`` says whether any load metric was there at all."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    block_size: int = 0
    num_gpu_blocks: int = 0
    found: bool = False


_WANTED = (*_RUNNING, *_WAITING, *_KV, "vllm:cache_config_info")


def _relevant(text: str) -> str:
    """Only the samples read here (a vLLM ``/metrics`` is ~100 kB of histograms: parsing all of it at every
    scrape would cost the router's event loop milliseconds)."""
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(_WANTED)) + "\n"


def parse_metrics(text: str) -> Scraped:
    """Parse Prometheus text exposition (raises ``ValueError`` on malformed text)."""
    text = _relevant(text)
    out = Scraped()
    running: dict[str, float] = {}
    waiting: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name
            if name in _RUNNING:
                running[name] = running.get(name, 0.0) + s.value
            elif name in _WAITING:
                waiting[name] = waiting.get(name, 0.0) + s.value
            elif name in _KV:
                out.kv_usage = max(out.kv_usage, float(s.value))
                out.found = True
            elif name == "vllm:cache_config_info":
                out.block_size = _int(s.labels.get("block_size"), out.block_size)
                out.num_gpu_blocks = _int(s.labels.get("num_gpu_blocks"), out.num_gpu_blocks)
    if running or waiting:
        out.found = True
    out.running = int(max(running.values(), default=0))
    out.waiting = int(max(waiting.values(), default=0))
    return out


def _int(v: str | None, default: int) -> int:
    try:
        return int(float(v)) if v not in (None, "", "None") else default
    except ValueError:
        return default


@dataclass(slots=True)
class ModelList:
    """A backend's ``/v1/models``: its base model, its max length, the adapters it has loaded."""

    base: str
    max_model_len: int = 0
    adapters: dict[str, str] = field(default_factory=dict)  # name -> root (the path it was loaded from)


def parse_models(data: Any) -> ModelList:
    """Parse ``/v1/models`` (raises ``ValueError`` when no base model is listed)."""
    items: Iterable[Any] = data.get("data", []) if isinstance(data, dict) else []
    cards = [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]
    bases = [m for m in cards if not m.get("parent")]
    if not bases:
        raise ValueError("/v1/models lists no base model")
    base = bases[0]
    out = ModelList(base["id"], int(base.get("max_model_len") or 0))
    for m in cards:
        if m.get("parent") == base["id"]:
            out.adapters[m["id"]] = str(m.get("root") or "")
    return out
