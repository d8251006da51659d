"""Local mode without starting Ray: manifests -> plans, GPU-class resources, adapter localisation, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from corral.serve.adapter_sources import fetch_adapter
from corral.serve.app import gpu_class_resource
from corral.serve.local_adapters import localize_adapters, make_tiny_adapter
from corral.serve.local_stack import LocalOptions, LocalStack
from corral.serve.manifests import load_manifests

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


def test_examples_load_as_a_pool_with_its_policy() -> None:
    pairs = load_manifests([EXAMPLES])
    assert len(pairs) == 1
    pool, policy = pairs[0]
    assert pool["kind"] == "ModelPool" and policy is not None and policy["kind"] == "RoutingPolicy"
    assert policy["spec"]["poolRef"] == pool["metadata"]["name"]


def test_local_stack_caps_replicas_declares_class_resources_and_localizes_adapters(tmp_path: Path) -> None:
    pairs = load_manifests([EXAMPLES])
    stack = LocalStack(
        pairs, LocalOptions(max_replicas_per_class=1, adapter_cache=tmp_path), log=lambda *_: None
    )
    plan = stack.plans[0]
    assert all(e.num_replicas == 1 for e in plan.engines)
    assert all(e.ray_actor_options["num_gpus"] == 0 for e in plan.engines)  # no GPU in local mode
    res = stack.resources()
    assert set(res) == {gpu_class_resource(c["name"]) for c in pairs[0][0]["spec"]["gpuClasses"]}
    assert stack.expected_engines() == len(plan.engines)
    assert any("instead of" in n for n in stack.notes)  # the cap is reported
    assert any("tiny adapters" in n for n in stack.notes)
    for a in plan.router.user_config["adapters"]:
        art = fetch_adapter(a["name"], a["source"], tmp_path / "fetched")  # every source now fetchable
        assert art.tensors > 0


def test_localize_keeps_fetchable_sources(tmp_path: Path) -> None:
    real = make_tiny_adapter(tmp_path / "real", rank=4).as_uri()
    pool: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {"adapters": [
        {"name": "real", "rank": 4, "source": real},
        {"name": "remote", "rank": 16, "source": "hf://org/repo"},
    ]}}  # fmt: skip
    assert localize_adapters(pool, tmp_path / "cache") == ["remote"]
    assert pool["spec"]["adapters"][0]["source"] == real
    assert pool["spec"]["adapters"][1]["source"].startswith("file://")


def test_cli_print_config_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    out = subprocess.run(
        [sys.executable, "-m", "corral.api.cli", "serve", "-f", str(EXAMPLES), "--print-config"],
        check=True, capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(out.stdout))
    assert cfg.applications[0].import_path == "corral.serve.application:build_app"
