"""Metrics of one sim replica under vLLM's names, plus per-request latency records.

Gauges (computed on demand by ``SimEngine.stats``): ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (0..1, as vLLM v1 reports it),
``vllm:lora_requests_info`` residency. Counters kept here: ``vllm:prefix_cache_queries`` /
``vllm:prefix_cache_hits`` (tokens looked up / found in the prefix cache, every lookup, as vLLM counts
them), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:num_preemptions_total``,
``vllm:request_success_total``. Per finished request: TTFT and TPOT (seconds), in ``RequestRecord``.

``in_system_area`` integrates the number of requests in the engine over time (for Little's law checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Latency record of one finished (or aborted) request; times are engine-clock seconds."""

    request_id: str
    arrival: float
    first_token: float | None
    finish: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    preemptions: int
    adapter: str | None = None
    aborted: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)


@dataclass(slots=True)
class EngineMetrics:
    """vLLM-named counters of one replica, and per-request records (bounded by ``keep_records``)."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    cpu_kv_hits: int = 0  # of prefix_cache_hits: tokens loaded from the CPU KV tier
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    request_success_total: int = 0
    steps_total: int = 0
    busy_seconds: float = 0.0
    in_system_area: float = 0.0
    _area_t: float = 0.0
    keep_records: int = 1_000_000
    records: list[RequestRecord] = field(default_factory=list)

    def advance(self, now: float, in_system: int) -> None:
        """Integrate the in-system count up to ``now`` (call before it changes)."""
        if now > self._area_t:
            self.in_system_area += in_system * (now - self._area_t)
            self._area_t = now

    def record(self, rec: RequestRecord) -> None:
        if len(self.records) < self.keep_records:
            self.records.append(rec)

    def counters(self) -> dict[str, float]:
        return {
            "vllm:prefix_cache_queries": self.prefix_cache_queries,
            "vllm:prefix_cache_hits": self.prefix_cache_hits,
            "vllm:prompt_tokens_total": self.prompt_tokens_total,
            "vllm:generation_tokens_total": self.generation_tokens_total,
            "vllm:num_preemptions_total": self.num_preemptions_total,
            "vllm:request_success_total": self.request_success_total,
        }
