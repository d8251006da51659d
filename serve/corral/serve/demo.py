"""The demo workload: multi-turn conversations over shared system prompts, some through LoRA adapters.

:func:`demo_workload` drives a running router's OpenAI HTTP API (``/v1/completions``, streamed) with
``conversations`` x ``turns`` requests — a few shared system prompts (so prefix caching shows), a third of
the conversations on adapters with Zipf popularity (so adapter paging shows) — and keeps
:class:`DemoStats` (requests, errors, prefix hit rate from the usage's cached tokens, TTFT, requests per
engine replica from the ``x-corral-replica`` header, adapter loads scraped from the router's metrics).
:func:`stats_table` renders them for the live view of ``corral demo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TOPICS = [
    "You are a support assistant for an online bookshop. Answer politely, cite order numbers, and never "
    "promise refunds without checking the return policy first.",
    "You are a senior SQL reviewer. Explain query plans, point out missing indexes and rewrite queries "
    "for PostgreSQL, keeping answers short and precise.",
    "You are a travel planner. Suggest itineraries with train connections, budget estimates and local "
    "food, and ask about accessibility needs before booking anything.",
]
_QUESTIONS = [
    "what can you help me with today",
    "give me a short example please",
    "can you explain that in more detail",
    "what are the trade offs here",
    "summarise the previous answer in one line",
]


@dataclass(slots=True)
class DemoStats:
    sent: int = 0
    done: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    per_replica: Counter[str] = field(default_factory=Counter)
    adapter_requests: int = 0
    adapter_loads: float = 0.0  # into GPU slots, as the engines reported them
    adapter_prefetches: float = 0.0  # into host memory (paging manager prefetch)
    last_error: str = ""

    def pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        s = sorted(self.ttft)
        return s[min(len(s) - 1, int(q * len(s)))]


def stats_table(stats: DemoStats, total: int, elapsed: float) -> Any:
    from rich.table import Table

    t = Table(title=f"corral demo — {elapsed:5.1f}s", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests done / total", f"{stats.done} / {total}")
    t.add_row("errors", str(stats.errors))
    hit = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
    t.add_row("prefix cache hit rate (tokens)", f"{hit:6.1%}")
    t.add_row("adapter requests", str(stats.adapter_requests))
    t.add_row(
        "adapter loads to GPU / prefetches to CPU",
        f"{stats.adapter_loads:.0f} / {stats.adapter_prefetches:.0f}",
    )
    t.add_row("TTFT p50 / p90", f"{stats.pct(0.5) * 1e3:6.1f} / {stats.pct(0.9) * 1e3:6.1f} ms")
    t.add_row("throughput", f"{stats.done / elapsed:5.1f} req/s" if elapsed > 0 else "-")
    if stats.per_replica:
        t.add_section()
        t.add_row("[bold]requests per engine replica[/]", "")
        for rid, n in sorted(stats.per_replica.items()):
            t.add_row(f"  replica {rid}", str(n))
    return t


async def _scrape_adapter_loads(session: Any, url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    gpu = cpu = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("corral_adapter_loads"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    if s.labels.get("tier") == "cpu":
                        cpu += s.value
                    else:
                        gpu += s.value
    return gpu, cpu


async def demo_workload(
    http_url: str,
    models: Sequence[str],
    adapters: Sequence[str],
    *,
    conversations: int = 24,
    turns: int = 4,
    concurrency: int = 6,
    max_tokens: int = 24,
    seed: int = 7,
    on_update: Callable[[DemoStats], None] | None = None,
    api_key: str | None = None,
) -> DemoStats:
    """Multi-turn conversations over shared system prompts; a third of them use a LoRA adapter (Zipf)."""
    import aiohttp
    import orjson

    rng = random.Random(seed)
    stats = DemoStats()
    zipf = [1.0 / (i + 1) for i in range(len(adapters))]
    convs = []
    for c in range(conversations):
        system = TOPICS[c % len(TOPICS)] * 6
        use_adapter = adapters and rng.random() < 0.35
        model = rng.choices(list(adapters), zipf)[0] if use_adapter else models[c % len(models)]
        convs.append((c, system, model))
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=120)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:

        async def conversation(c: int, system: str, model: str) -> None:
            history = f"system: {system}\n"
            for turn in range(turns):
                history += f"user {c}: {_QUESTIONS[(c + turn) % len(_QUESTIONS)]}\n"
                body = {
                    "model": model,
                    "prompt": history + "assistant:",
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with sem:
                    stats.sent += 1
                    t0 = time.perf_counter()
                    first = None
                    text = ""
                    try:
                        async with session.post(http_url + "/v1/completions", json=body) as r:
                            if r.status != 200:
                                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
                            replica = r.headers.get("x-corral-replica", "?")
                            async for raw in r.content:
                                line = raw.strip()
                                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                    continue
                                ev = orjson.loads(line[6:])
                                if "error" in ev:
                                    raise RuntimeError(str(ev["error"])[:200])
                                if first is None and ev.get("choices"):
                                    first = time.perf_counter() - t0
                                for ch in ev.get("choices") or []:
                                    text += ch.get("text") or ""
                                u = ev.get("usage")
                                if u:
                                    stats.prompt_tokens += int(u.get("prompt_tokens", 0))
                                    details = u.get("prompt_tokens_details") or {}
                                    stats.cached_tokens += int(details.get("cached_tokens", 0) or 0)
                        stats.done += 1
                        stats.ttft.append(first if first is not None else time.perf_counter() - t0)
                        stats.per_replica[replica] += 1
                        if model in adapters:
                            stats.adapter_requests += 1
                    except Exception as e:
                        stats.errors += 1
                        stats.last_error = str(e)
                history += f"assistant: {text.strip()[:200]}\n"
                if on_update is not None:
                    on_update(stats)

        async def scraper() -> None:
            while True:
                with contextlib.suppress(Exception):
                    stats.adapter_loads, stats.adapter_prefetches = await _scrape_adapter_loads(
                        session, http_url
                    )
                if on_update is not None:
                    on_update(stats)
                await asyncio.sleep(0.5)

        scrape = asyncio.create_task(scraper())
        try:
            await asyncio.gather(*(conversation(*cv) for cv in convs))
        finally:
            scrape.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scrape
            with contextlib.suppress(Exception):
                stats.adapter_loads, stats.adapter_prefetches = await _scrape_adapter_loads(session, http_url)
    return stats
