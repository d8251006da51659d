"""Workload generators and trace loaders are deterministic per seed and keep the trace semantics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from corral.router.hashing import salted_ids
from corral.serve.sim import workloads as W


def _sig(w: W.Workload) -> list[tuple]:
    return [
        (r.request_id, round(r.arrival, 9), r.prompt_tokens, r.max_tokens, tuple(r.block_hashes), r.adapter)
        for r in w.requests
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda s: W.shared_prefix(300, seed=s),
        lambda s: W.multi_turn(60, seed=s),
        lambda s: W.zero_reuse(300, seed=s),
        lambda s: W.lora_zipf(16, 300, seed=s),
        lambda s: W.bursty(300, seed=s),
    ],
)
def test_synthetic_workloads_are_reproducible_per_seed(make) -> None:  # type: ignore[no-untyped-def]
    a, b, c = make(1), make(1), make(2)
    assert _sig(a) == _sig(b)
    assert _sig(a) != _sig(c)
    arr = [r.arrival for r in a.requests]
    assert arr == sorted(arr)
    for r in a.requests:
        assert len(r.block_hashes) == r.prompt_tokens // a.block_size


def test_shared_prefix_has_high_reuse_and_zero_reuse_has_none() -> None:
    assert W.prefix_reuse(W.shared_prefix(1000).requests, 16) > 0.8
    assert W.prefix_reuse(W.zero_reuse(500).requests, 16) == 0.0


def test_lora_zipf_popularity_and_salting() -> None:
    w = W.lora_zipf(128, 4000, zipf_s=1.0)
    counts: dict[str, int] = {}
    for r in w.requests:
        counts[r.adapter or ""] = counts.get(r.adapter or "", 0) + 1
    top = sorted(counts.values(), reverse=True)
    assert top[0] > 10 * top[-1]  # heavy head
    assert len(counts) > 64
    # same block contents under different adapters never share hashes
    by_adapter: dict[str, set[int]] = {}
    for r in w.requests:
        by_adapter.setdefault(r.adapter or "", set()).update(r.block_hashes)
    names = list(by_adapter)
    assert not (by_adapter[names[0]] & by_adapter[names[1]])
    assert all(r.adapter_mb and r.adapter_mb > 10 for r in w.requests)


def test_multi_turn_next_prompt_extends_previous_prompt_and_answer() -> None:
    w = W.multi_turn(30, mean_turns=4, seed=3)
    by_conv: dict[str, list[W.Request]] = {}
    for r in w.requests:
        by_conv.setdefault(r.session or "", []).append(r)
    checked = 0
    for turns in by_conv.values():
        for prev, nxt in itertools.pairwise(turns):
            seen = prev.block_hashes + (prev.output_block_hashes or [])
            assert nxt.block_hashes[: len(seen)] == seen
            checked += 1
    assert checked > 10


def test_mooncake_loader_spreads_buckets_and_maps_hash_ids(tmp_path: Path) -> None:
    rows = [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 0, "input_length": 600, "output_length": 7, "hash_ids": [0, 3]},
        {"timestamp": 0, "input_length": 300, "output_length": 1, "hash_ids": [4]},
        {"timestamp": 3000, "input_length": 2048, "output_length": 9, "hash_ids": [0, 1, 5, 6]},
    ]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a = W.load_mooncake(p, seed=1)
    b = W.load_mooncake(p, seed=1)
    assert _sig(a) == _sig(b)
    assert a.block_size == 512
    first3 = sorted(r.arrival for r in a.requests[:3])
    assert first3[0] >= 0.0 and first3[-1] < 3.0 and len(set(first3)) == 3
    by_len = {r.prompt_tokens: r for r in a.requests}
    assert by_len[1100].block_hashes == salted_ids([0, 1])  # only full 512-token blocks
    assert by_len[300].block_hashes == []
    assert by_len[2048].block_hashes == salted_ids([0, 1, 5, 6])
    assert W.load_mooncake(p, spread=False).requests[3].arrival == 3.0
    lim = W.load_mooncake(p, limit=2)
    assert len(lim.requests) == 2
    salted = W.load_mooncake(p, adapter="x")
    assert salted.requests[0].block_hashes != a.requests[0].block_hashes


def test_azure_csv_loader(tmp_path: Path) -> None:
    p = tmp_path / "az.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:47.0000000,879,0\n"
    )
    w = W.load_trace(p)
    assert [r.prompt_tokens for r in w.requests] == [374, 879, 396]
    assert w.requests[0].arrival == 0.0
    assert w.requests[2].arrival == pytest.approx(4.314579, abs=1e-6)
    assert w.requests[1].max_tokens == 1  # at least one token
    assert all(r.block_hashes == [] for r in w.requests)


def test_shipped_mooncake_sample_matches_the_shared_trace_head() -> None:
    root = Path(__file__).resolve().parents[2]
    sample = root / "bench" / "corral" / "bench" / "data" / "conversation_trace_head.jsonl"
    if not sample.exists():
        pytest.skip("sample not shipped")
    shared = root.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
    n = sum(1 for _ in sample.open())
    assert n >= 1000
    if shared.exists():
        with shared.open() as f:
            head = [next(f) for _ in range(n)]
        assert head == sample.open().readlines()
