"""``corral bench select`` runs end to end on a small stream and writes its results (numbers are in
docs/benchmarks/select.md, not asserted here beyond what must hold by construction)."""

from __future__ import annotations

import json
from pathlib import Path

from corral.bench import select


def test_task_mix_is_labelled_and_deterministic() -> None:
    a, b = select.task_mix(50, seed=3), select.task_mix(50, seed=3)
    assert a == b and {k for k, _ in a} <= set(select.KINDS)
    assert set(select.QUALITY) == set(select.KINDS) and all(
        set(q) == set(select.TARGETS) for q in select.QUALITY.values()
    )
    for policy in select.policies().values():  # the shipped policies pass the API's checks
        assert {t for r in policy.rules for t in r.targets()} <= set(select.TARGETS)


def test_bench_writes_json_markdown_and_plot(tmp_path: Path) -> None:
    assert select.main(["--requests", "120", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "select.json").read_text())
    assert set(doc["strategies"]) == set(select.STRATEGIES)
    assert doc["strategies"]["oracle"]["regret_total"] == 0
    assert all(
        s["regret_total"] >= 0 for s in doc["strategies"].values()
    )  # the oracle is the best in expectation
    assert doc["strategies"]["always_largest"]["picks"] == {"llama-70b": 120}
    assert {"p50_us", "p99_us"} <= set(doc["overhead_us"]["rules"]) and doc["meta"]["argv"]
    assert (tmp_path / "select.png").stat().st_size > 0
    assert "| rules |" in (tmp_path / "select.md").read_text()
