"""Workloads for the sim engine and the fleet benchmark: trace replay and synthetic generators.

Every generator is deterministic for a given ``seed`` and returns a :class:`Workload`: requests sorted by
arrival (seconds, at rate scale 1) whose prompts are already cut into chained block hashes in the hash
space of :mod:`corral.router.hashing` (salted by adapter, so equal tokens under different adapters never
share KV). Rate scaling divides arrival times by the scale (timestamps are compressed, the order and
burst structure are kept).

- :func:`load_mooncake`: Mooncake FAST'25 JSONL (``timestamp`` ms, ``input_length``, ``output_length``,
  ``hash_ids`` of 512-token blocks). Block size 512; only *full* prompt blocks are hashed (vLLM hashes
  full blocks only); ids are mapped with :func:`~corral.router.hashing.salted_ids`. The conversation
  trace's timestamps come in ~3 s buckets; ``spread=True`` spreads each bucket's requests uniformly over
  the bucket (seeded, file order kept).
- :func:`load_azure_csv`: Azure LLM inference trace CSV (``TIMESTAMP``, ``ContextTokens``,
  ``GeneratedTokens``): load only, no prefix information (no block hashes).
- :func:`shared_prefix`: system prompts x users (two shared levels, then a unique question).
- :func:`multi_turn`: conversations whose next prompt extends the previous prompt + answer; requests
  carry ``output_block_hashes`` so an answer's KV can be hit by the next turn (vLLM caches full decode
  blocks too).
- :func:`zero_reuse`: unique prompts, the load-balancing control.
- :func:`lora_zipf`: N adapters (ranks 8-64, sizes from :func:`~corral.api.profiles.adapter_mb`) with Zipf
  popularity; each adapter has its own prompt template.
- :func:`bursty`: shared-prefix content with Gamma inter-arrivals (coefficient of variation ``cv``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import xxhash
from corral.api.profiles import adapter_mb
from corral.router.hashing import root_seed, salt_for, salted_ids

_xxh = xxhash.xxh3_64_intdigest
MOONCAKE_BLOCK = 512


@dataclass(slots=True)
class Request:
    """One request of a workload (prompt already hashed into full blocks of ``Workload.block_size``)."""

    request_id: str
    arrival: float
    prompt_tokens: int
    max_tokens: int
    block_hashes: list[int]
    adapter: str | None = None
    adapter_mb: float | None = None
    output_block_hashes: list[int] | None = None
    session: str | None = None


@dataclass
class Workload:
    """A named request sequence plus how to judge it."""

    name: str
    requests: list[Request]
    block_size: int
    slo_ttft_s: float = 2.0
    description: str = ""
    adapters: int = 0
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def span_s(self) -> float:
        if len(self.requests) < 2:
            return 1.0
        return max(1e-9, self.requests[-1].arrival - self.requests[0].arrival)

    @property
    def base_rate(self) -> float:
        """Mean arrival rate (req/s) at scale 1."""
        return len(self.requests) / self.span_s

    def head(self, n: int) -> Workload:
        """The first ``n`` requests (same parameters)."""
        return Workload(
            self.name,
            self.requests[:n],
            self.block_size,
            self.slo_ttft_s,
            self.description,
            self.adapters,
            dict(self.meta),
        )

    def summary(self) -> dict[str, object]:
        reqs = self.requests
        ptoks = np.array([r.prompt_tokens for r in reqs]) if reqs else np.zeros(1)
        otoks = np.array([r.max_tokens for r in reqs]) if reqs else np.zeros(1)
        return {
            "name": self.name,
            "requests": len(reqs),
            "block_size": self.block_size,
            "base_rate_rps": round(self.base_rate, 3),
            "prompt_tokens_mean": round(float(ptoks.mean()), 1),
            "output_tokens_mean": round(float(otoks.mean()), 1),
            "prefix_reuse_upper_bound": round(prefix_reuse(reqs, self.block_size), 4),
            "adapters": self.adapters,
            "slo_ttft_s": self.slo_ttft_s,
            **self.meta,
        }


def prefix_reuse(reqs: Sequence[Request], block_size: int) -> float:
    """Token share of prompts that an unbounded shared cache would hit (upper bound for any routing)."""
    seen: set[int] = set()
    hit = total = 0
    for r in reqs:
        k = 0
        for h in r.block_hashes:
            if h not in seen:
                break
            k += 1
        hit += min(k * block_size, r.prompt_tokens - 1)
        total += r.prompt_tokens
        seen.update(r.block_hashes)
        if r.output_block_hashes:
            seen.update(r.output_block_hashes)
    return hit / max(1, total)


# ---- hashing helpers ---------------------------------------------------------------------------------
def chain(keys: Iterable[int], parent: int) -> list[int]:
    """Chained block hashes of blocks whose contents are identified by ``keys``, after ``parent``."""
    out = []
    h = parent
    for k in keys:
        h = _xxh((k & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), h)
        out.append(h)
    return out


def _content(*parts: int) -> int:
    return _xxh(np.asarray(parts, dtype=np.int64).tobytes())


# ---- traces ---------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")  # type: ignore[return-value]


def load_mooncake(
    path: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    spread: bool = True,
    bucket_ms: float = 3000.0,
    adapter: str | None = None,
    name: str | None = None,
    slo_ttft_s: float = 5.0,
) -> Workload:
    """Replay a Mooncake-format JSONL trace (see the module docstring)."""
    path = Path(path)
    rows = []
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    ts = np.array([float(r["timestamp"]) for r in rows])
    if spread and len(rows):
        rng = np.random.default_rng(seed)
        distinct = np.unique(ts)
        gaps = np.diff(distinct)
        default = float(np.median(gaps)) if len(gaps) else bucket_ms
        width = {float(t): float(min(bucket_ms, g)) for t, g in zip(distinct, [*gaps, default], strict=True)}
        out = ts.copy()
        i = 0
        while i < len(ts):
            j = i
            while j < len(ts) and ts[j] == ts[i]:
                j += 1
            offs = np.sort(rng.uniform(0.0, width[float(ts[i])], j - i))
            out[i:j] = ts[i] + offs
            i = j
        ts = out
    salt = salt_for(adapter) if adapter else None
    t0 = float(ts[0]) if len(ts) else 0.0
    reqs = []
    for k, (r, t) in enumerate(zip(rows, ts, strict=True)):
        n_in = int(r["input_length"])
        full = n_in // MOONCAKE_BLOCK
        reqs.append(
            Request(
                request_id=f"mc{k:06d}",
                arrival=(float(t) - t0) / 1000.0,
                prompt_tokens=max(1, n_in),
                max_tokens=max(1, int(r["output_length"])),
                block_hashes=salted_ids(r["hash_ids"][:full], salt),
                adapter=adapter,
            )
        )
    reqs.sort(key=lambda r: r.arrival)
    return Workload(
        name or path.stem.replace(".jsonl", ""),
        reqs,
        MOONCAKE_BLOCK,
        slo_ttft_s,
        f"Mooncake trace {path.name} ({len(reqs)} requests, 512-token blocks)",
    )


def _parse_ts(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    if "." in s:  # Azure traces carry 7 fractional digits; fromisoformat wants at most 6
        head, frac = s.split(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        rest = frac[len(digits) :]
        s = f"{head}.{digits[:6]}{rest}"
    return datetime.fromisoformat(s).timestamp()


def load_azure_csv(
    path: str | Path,
    *,
    limit: int | None = None,
    block_size: int = 16,
    name: str | None = None,
    slo_ttft_s: float = 2.0,
) -> Workload:
    """Replay an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens): load only."""
    path = Path(path)
    reqs: list[Request] = []
    with _open_text(path) as f:
        for k, row in enumerate(csv.DictReader(f)):
            if limit is not None and k >= limit:
                break
            reqs.append(
                Request(
                    request_id=f"az{k:06d}",
                    arrival=_parse_ts(row["TIMESTAMP"]),
                    prompt_tokens=max(1, int(row["ContextTokens"])),
                    max_tokens=max(1, int(row["GeneratedTokens"])),
                    block_hashes=[],
                )
            )
    reqs.sort(key=lambda r: r.arrival)
    if reqs:
        t0 = reqs[0].arrival
        for r in reqs:
            r.arrival -= t0
    return Workload(
        name or path.stem,
        reqs,
        block_size,
        slo_ttft_s,
        f"Azure trace {path.name} ({len(reqs)} requests, load only: no prefix information)",
    )


def load_trace(path: str | Path, **kwargs: object) -> Workload:
    """Mooncake JSONL or Azure CSV, by extension (``.jsonl``/``.json`` vs ``.csv``, optionally ``.gz``)."""
    p = Path(path)
    stem = p.name[:-3] if p.name.endswith(".gz") else p.name
    if stem.endswith(".csv"):
        return load_azure_csv(p, **kwargs)  # type: ignore[arg-type]
    return load_mooncake(p, **kwargs)  # type: ignore[arg-type]


# ---- synthetic ------------------------------------------------------------------------------------
def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    return np.cumsum(rng.exponential(1.0 / rate, n))


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """Gamma inter-arrivals with mean 1/rate and coefficient of variation ``cv`` (bursty for cv > 1)."""
    shape = 1.0 / (cv * cv)
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), n))


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _uniform_int(
    rng: np.random.Generator, lo_hi: tuple[int, int], size: int | tuple[int, ...] | None = None
) -> np.ndarray:
    return rng.integers(lo_hi[0], lo_hi[1] + 1, size)


def shared_prefix(
    n_requests: int = 2000,
    *,
    groups: int = 48,
    users_per_group: int = 8,
    system_tokens: tuple[int, int] = (2048, 6144),
    user_tokens: tuple[int, int] = (512, 2048),
    question_tokens: tuple[int, int] = (32, 384),
    output_tokens: tuple[int, int] = (32, 256),
    rate: float = 10.0,
    group_zipf: float = 0.6,
    block_size: int = 16,
    seed: int = 0,
    arrivals: np.ndarray | None = None,
    name: str = "shared_prefix",
    slo_ttft_s: float = 2.0,
) -> Workload:
    """System prompts x users: prompt = system[g] + user context[g, u] + a unique question."""
    rng = np.random.default_rng(seed)
    bs = block_size
    sys_len = _uniform_int(rng, system_tokens, groups)
    user_len = _uniform_int(rng, user_tokens, (groups, users_per_group))
    root = root_seed(None)
    # Hash chain of the (g, u) shared part: blocks inside the system prompt depend on g only.
    chains: dict[tuple[int, int], list[int]] = {}
    sys_chain = [
        chain((_content(1, g, k) for k in range(int(sys_len[g]) // bs)), root) for g in range(groups)
    ]
    for g in range(groups):
        for u in range(users_per_group):
            shared = int(sys_len[g] + user_len[g, u])
            base = sys_chain[g]
            nb = shared // bs
            parent = base[-1] if base else root
            chains[g, u] = base + chain((_content(2, g, u, k) for k in range(len(base), nb)), parent)
    gw = zipf_weights(groups, group_zipf)
    gs = rng.choice(groups, n_requests, p=gw)
    us = rng.integers(0, users_per_group, n_requests)
    qs = _uniform_int(rng, question_tokens, n_requests)
    outs = _uniform_int(rng, output_tokens, n_requests)
    ts = arrivals if arrivals is not None else poisson_arrivals(rng, n_requests, rate)
    reqs = []
    for i in range(n_requests):
        g, u = int(gs[i]), int(us[i])
        shared = int(sys_len[g] + user_len[g, u])
        p = shared + int(qs[i])
        base = chains[g, u]
        nb = p // bs
        parent = base[-1] if base else root
        hashes = base[:nb] + chain((_content(3, i, k) for k in range(len(base), nb)), parent)
        reqs.append(Request(f"sp{i:06d}", float(ts[i]), p, int(outs[i]), hashes, session=f"g{g}u{u}"))
    reqs.sort(key=lambda r: r.arrival)
    return Workload(
        name,
        reqs,
        bs,
        slo_ttft_s,
        f"{groups} system prompts ({system_tokens[0]}-{system_tokens[1]} tok, Zipf {group_zipf}) x "
        f"{users_per_group} users ({user_tokens[0]}-{user_tokens[1]} tok) + unique question",
    )


def multi_turn(
    n_conversations: int = 400,
    *,
    mean_turns: float = 5.0,
    max_turns: int = 12,
    system_prompts: int = 8,
    system_tokens: tuple[int, int] = (1024, 3072),
    user_tokens: tuple[int, int] = (64, 512),
    output_tokens: tuple[int, int] = (64, 512),
    think_time_s: float = 20.0,
    conv_rate: float = 2.0,
    block_size: int = 16,
    seed: int = 0,
    name: str = "multi_turn",
    slo_ttft_s: float = 2.0,
) -> Workload:
    """Conversations: turn j's prompt = system + (user, answer) x (j - 1) + user message j."""
    rng = np.random.default_rng(seed)
    bs = block_size
    root = root_seed(None)
    sys_len = _uniform_int(rng, system_tokens, system_prompts)
    sys_chain = [
        chain((_content(10, s, k) for k in range(int(sys_len[s]) // bs)), root) for s in range(system_prompts)
    ]
    starts = poisson_arrivals(rng, n_conversations, conv_rate)
    reqs: list[Request] = []
    for c in range(n_conversations):
        s = int(rng.integers(0, system_prompts))
        turns = int(min(max_turns, rng.geometric(1.0 / mean_turns)))
        users = _uniform_int(rng, user_tokens, turns)
        outs = _uniform_int(rng, output_tokens, turns)
        thinks = rng.exponential(think_time_s, turns)
        total = int(sys_len[s] + users.sum() + outs.sum())
        base = sys_chain[s]
        parent = base[-1] if base else root
        conv = base + chain((_content(11, c, k) for k in range(len(base), total // bs)), parent)
        pos = int(sys_len[s])
        t = float(starts[c])
        for j in range(turns):
            p = pos + int(users[j])
            o = int(outs[j])
            reqs.append(
                Request(
                    f"mt{c:05d}.{j:02d}",
                    t,
                    p,
                    o,
                    conv[: p // bs],
                    output_block_hashes=conv[p // bs : (p + o) // bs],
                    session=f"c{c}",
                )
            )
            pos = p + o
            t += o * 0.02 + float(thinks[j])  # answer streaming (~20 ms/token) + user think time
    reqs.sort(key=lambda r: r.arrival)
    for k, r in enumerate(reqs):
        r.request_id = f"{r.request_id}#{k}"
    return Workload(
        name,
        reqs,
        bs,
        slo_ttft_s,
        f"{n_conversations} conversations, mean {mean_turns} turns, {system_prompts} system prompts, "
        f"think time {think_time_s}s",
    )


def zero_reuse(
    n_requests: int = 2000,
    *,
    prompt_tokens: tuple[int, int] = (512, 12288),
    output_tokens: tuple[int, int] = (64, 768),
    rate: float = 10.0,
    block_size: int = 16,
    seed: int = 0,
    name: str = "zero_reuse",
    slo_ttft_s: float = 2.0,
) -> Workload:
    """Unique prompts (log-uniform lengths), Poisson arrivals: nothing to reuse, only load to balance."""
    rng = np.random.default_rng(seed)
    lo, hi = prompt_tokens
    ps = np.exp(rng.uniform(math.log(lo), math.log(hi), n_requests)).astype(int)
    outs = _uniform_int(rng, output_tokens, n_requests)
    ts = poisson_arrivals(rng, n_requests, rate)
    reqs = [
        Request(
            f"zr{i:06d}",
            float(ts[i]),
            int(ps[i]),
            int(outs[i]),
            # unique content: random 63-bit hashes (a fresh chain shares nothing with any other prompt)
            [int(h) for h in rng.integers(1, 1 << 63, int(ps[i]) // block_size, dtype=np.int64)],
        )
        for i in range(n_requests)
    ]
    return Workload(
        name, reqs, block_size, slo_ttft_s, "unique prompts, Poisson arrivals (load-only control)"
    )


def lora_zipf(
    n_adapters: int = 128,
    n_requests: int = 3000,
    *,
    zipf_s: float = 1.0,
    ranks: Sequence[int] = (8, 16, 32, 64),
    rank_p: Sequence[float] = (0.3, 0.4, 0.2, 0.1),
    template_tokens: tuple[int, int] = (256, 1024),
    prompt_tokens: tuple[int, int] = (64, 1024),
    output_tokens: tuple[int, int] = (32, 256),
    rate: float = 20.0,
    block_size: int = 16,
    seed: int = 0,
    name: str | None = None,
    slo_ttft_s: float = 1.0,
) -> Workload:
    """Requests for ``n_adapters`` LoRA adapters with Zipf(``zipf_s``) popularity (adapter 0 hottest).

    Each adapter has a prompt template (shared within the adapter, salted by it) and a rank drawn from
    ``ranks``; its size is the Llama-3.1-8B all-linear LoRA size at that rank."""
    rng = np.random.default_rng(seed)
    bs = block_size
    names = [f"lora-{k:04d}" for k in range(n_adapters)]
    adapter_ranks = rng.choice(np.asarray(ranks), n_adapters, p=np.asarray(rank_p))
    sizes = {names[k]: round(adapter_mb(int(adapter_ranks[k])), 2) for k in range(n_adapters)}
    tmpl_len = _uniform_int(rng, template_tokens, n_adapters)
    roots = [root_seed(salt_for(a)) for a in names]
    tmpl_chain = [
        chain((_content(20, k, b) for b in range(int(tmpl_len[k]) // bs)), roots[k])
        for k in range(n_adapters)
    ]
    # Shuffle which adapter id is hot so popularity is not correlated with the name order.
    perm = rng.permutation(n_adapters)
    pick = perm[rng.choice(n_adapters, n_requests, p=zipf_weights(n_adapters, zipf_s))]
    ps = _uniform_int(rng, prompt_tokens, n_requests)
    outs = _uniform_int(rng, output_tokens, n_requests)
    ts = poisson_arrivals(rng, n_requests, rate)
    reqs = []
    for i in range(n_requests):
        k = int(pick[i])
        a = names[k]
        p = int(tmpl_len[k] + ps[i])
        base = tmpl_chain[k]
        parent = base[-1] if base else roots[k]
        hashes = base + chain((_content(21, i, b) for b in range(len(base), p // bs)), parent)
        reqs.append(Request(f"lz{i:06d}", float(ts[i]), p, int(outs[i]), hashes, a, sizes[a]))
    return Workload(
        name or f"lora_zipf_{n_adapters}",
        reqs,
        bs,
        slo_ttft_s,
        f"{n_adapters} LoRA adapters (ranks {list(ranks)}), Zipf s={zipf_s}, per-adapter template",
        adapters=n_adapters,
    )


def bursty(
    n_requests: int = 2000,
    *,
    rate: float = 10.0,
    cv: float = 3.0,
    seed: int = 0,
    block_size: int = 16,
    name: str = "bursty",
    slo_ttft_s: float = 2.0,
    **shared_kwargs: object,
) -> Workload:
    """Shared-prefix content with bursty (Gamma, coefficient of variation ``cv``) arrivals."""
    rng = np.random.default_rng(seed + 7919)
    ts = gamma_arrivals(rng, n_requests, rate, cv)
    w = shared_prefix(
        n_requests,
        rate=rate,
        seed=seed,
        block_size=block_size,
        arrivals=ts,
        name=name,
        slo_ttft_s=slo_ttft_s,
        **shared_kwargs,  # type: ignore[arg-type]
    )
    w.description = f"bursty arrivals (Gamma, CV {cv}); {w.description}"
    return w
