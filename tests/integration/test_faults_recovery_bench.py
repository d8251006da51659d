"""``corral bench recovery --quick`` runs end to end (real engine and router processes on loopback) and
writes every figure with its provenance; the figures themselves are recorded, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.serve import bench_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_recovery_bench_quick(tmp_path: Path) -> None:
    recovery = bench_cli.load("recovery")
    assert recovery.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "recovery.json").read_text())
    assert set(res["figures"]) == set(recovery.FIGURES)
    for name, f in res["figures"].items():
        assert len(f["samples_s"]) == 1 and f["median_s"] > 0, name
    assert "git" in res["meta"] and "dirty" in res["meta"]
    md = (tmp_path / "recovery.md").read_text()
    assert all(f"`{k}`" in md for k in recovery.FIGURES)
