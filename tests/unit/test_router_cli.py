"""The standalone router (``python -m corral.router.server``) routes exactly as the deployed one: its
settings come from the same RoutingPolicy/ModelPool files through ``router_settings``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from corral.api.validation import validate_paths
from corral.router.server.__main__ import _config, build_parser
from corral.router.settings import router_settings

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def _ns(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_routing_policy_file_gives_the_deployed_settings() -> None:
    objs = validate_paths([EXAMPLES]).objects
    pool = next(o for o in objs if o.kind == "ModelPool")
    policy = next(o for o in objs if o.kind == "RoutingPolicy")
    want = router_settings(policy, pool)
    cfg = _config(_ns("-f", str(EXAMPLES)))
    got = cfg.settings()
    assert (got.strategy, dict(got.policy_params), got.index_mode, got.max_queue_per_replica) == (
        want.strategy,
        dict(want.policy_params),
        want.index_mode,
        want.max_queue_per_replica,
    )
    assert cfg.adapters == {a.name: (a.base_model, a.source) for a in want.adapters.values()}


def test_defaults_without_a_file_are_the_crds() -> None:
    got = _config(_ns()).settings()
    want = router_settings(None)
    assert (got.strategy, dict(got.policy_params), got.index_mode) == (
        want.strategy,
        dict(want.policy_params),
        want.index_mode,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-f", "/nonexistent/policy.yaml"], "/nonexistent/policy.yaml"),
        (["--tokenizer", "m=/nonexistent/tok"], "/nonexistent/tok"),
        (["--policy", "fastest"], "unknown routing policy 'fastest'"),
    ],
)
def test_bad_inputs_are_one_line_errors(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral.router.server", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "corral.router.server", "--http-port", str(port), "--grpc-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"HTTP port {port}" in out.stderr and "in use" in out.stderr


def test_the_pools_gpu_class_profiles_reach_the_engine_pool() -> None:
    # ModelPool spec.gpuClasses (profiles with the pool's overrides) are what the cost model prices
    # replicas with; the standalone router parsed them and then used the built-in profiles.
    from corral.router.server import RouterServer

    objs = validate_paths([EXAMPLES]).objects
    pool = next(o for o in objs if o.kind == "ModelPool")
    policy = next(o for o in objs if o.kind == "RoutingPolicy")
    want = router_settings(policy, pool).profiles
    assert want
    server = RouterServer([], _config(_ns("-f", str(EXAMPLES))))
    assert server.router.pool.profiles == dict(want)
