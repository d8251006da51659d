"""``corral bench load --short`` in CI: a real router and sim engine processes on loopback pushed to 2x
their measured capacity by two tenants of weights 3 and 1. Asserts behaviour, not speed: no request is
lost (each ends with a complete response or a 429 carrying Retry-After), overload was real (some were
refused), the heavier tenant got more, and the router holds no slot afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

load = pytest.importorskip("corral.bench.load")


def test_load_short_loses_nothing(tmp_path: Path) -> None:
    rc = load.main(["--short", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "load.json").read_text())
    ov = doc["overload"]
    assert ov["lost"] == 0, (ov["lost_kinds"], ov["lost_examples"])
    assert ov["sent"] == ov["completed"] + ov["rejected_429"]
    assert ov["rejected_429"] > 0 and ov["retry_after_s"]["min"] >= 1  # every 429 carried Retry-After
    assert sum(doc["router_rejected"].values()) == ov["rejected_429"]  # the router counted each one
    assert ov["completed"] > 0 and doc["router_admitted"] == ov["completed"]
    gold, bronze = ov["tenants"]["gold"], ov["tenants"]["bronze"]
    assert gold["completed"] > bronze["completed"] > 0
    assert doc["leaks"]["held"] == {}
    assert rc == 0
    assert "**lost**" in (tmp_path / "load.md").read_text()
