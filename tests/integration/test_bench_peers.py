"""``corral bench peers`` end to end on a tiny workload with Corral only (the peers are optional): real fake
vLLM workers and a real ``corral router`` process on loopback; the results name every workload's numbers and
say which peers were not installed when they were asked for and missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.bench import peers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_bench_peers_corral_only_tiny(tmp_path: Path) -> None:
    rc = peers.main(["--quick", "--peers", "corral", "--requests", "12", "--conversation-requests", "12",
                     "--hop-requests", "30", "--workers", "2", "--concurrency", "4", "--prefix-tokens", "256",
                     "--groups", "2", "--repeats", "2", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["meta"]["git"] is not None and "params" in data["meta"]
    corral = data["results"]["corral"]
    assert [len(corral[w]["runs"]) for w in ("shared_prefix", "hop")] == [2, 2]  # medians of 2 runs
    assert set(corral) == {"conversation", "shared_prefix", "no_reuse", "hop"}
    for wl, r in corral.items():
        assert r["ok"] == r["requests"] and not r["errors"], (wl, r)
        assert r["throughput_rps"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
        assert sum(r["requests_per_worker"]) == r["requests"] + r.get("serial_requests", 0)
    # 2 groups of a 256-token prefix over 12 requests: most prompt tokens are cache hits at the workers
    assert corral["shared_prefix"]["prefix_hit_rate"] > 0.5
    assert corral["no_reuse"]["prefix_hit_rate"] == 0.0
    assert {"hop_overhead_ms", "hop_overhead_loaded_ms", "hop_overhead_whole_ms"} <= set(corral["hop"])
    assert data["results"]["direct"]["hop"]["ok"] == 30 and corral["hop"]["serial_requests"] == 40
    md = (tmp_path / "peers.md").read_text()
    assert "| shared_prefix | corral |" in md and (tmp_path / "peers.png").stat().st_size > 0


def test_missing_peer_is_reported_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "peer_command", lambda name, peer_bin: None)
    rc = peers.main(["--peers", "vllm-router", "--workloads", "hop", "--hop-requests", "5", "--workers", "1",
                     "--concurrency", "1", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["peers"]["vllm-router"]["installed"] is False
    assert "vllm-router" not in data["results"]
    assert "**vllm-router: not installed**" in (tmp_path / "peers.md").read_text()
