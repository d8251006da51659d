"""ModelPool ``kvOffload`` reaches the engines (vLLM args, the simulator's CPU KV tier) and KV events keep
their medium over the wire."""

from __future__ import annotations

import copy
from typing import Any

from corral.api.modelpool import ModelPool
from corral.api.profiles import BUILTIN_PROFILES
from corral.router import wire
from corral.router.backends.kv_events import KvEventSubscriber
from corral.router.events import BlockRemoved, BlockStored
from corral.serve.app import plan_pool

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "chat", "namespace": "default"},
    "spec": {
        "models": [{"name": "tiny", "baseModel": "tiny", "engine": "sim"}],
        "gpuClasses": [{"name": "h100", "minReplicas": 1, "maxReplicas": 1, "profile": "H100"}],
    },
}
POLICY: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "p"},
    "spec": {"poolRef": "chat"},
}
ENGINE_KW: dict[str, Any] = dict(
    replica_id="s0", model="tiny", base_model="tiny", gpu_class="h100", profile="H100",
    block_size=16, max_loras=2, max_cpu_loras=2, engine_args={}, max_model_len=None,
)  # fmt: skip


def test_kv_offload_defaults_to_none_and_reaches_the_engine_plan() -> None:
    assert ModelPool.model_validate(POOL).spec.kv_offload.cpu_gib == 0.0
    pool = copy.deepcopy(POOL)
    pool["spec"]["kvOffload"] = {"cpuGib": 64, "backend": "lmcache"}
    plan = plan_pool(pool, POLICY)
    kw = plan.engines[0].init_kwargs
    assert (kw["kv_offload_gib"], kw["kv_offload_backend"]) == (64, "lmcache")


async def test_sim_engine_gets_a_cpu_kv_tier_of_that_size() -> None:
    from corral.serve.deployments import make_engine

    with_tier = await make_engine("sim", kv_offload_gib=1.0, **ENGINE_KW)
    without = await make_engine("sim", **ENGINE_KW)
    try:
        tokens = 2**30 // BUILTIN_PROFILES["H100"].kv_bytes_per_token
        assert with_tier.sim.cpu_kv is not None and with_tier.sim.cpu_kv.capacity_blocks == tokens // 16
        assert without.sim.cpu_kv is None
    finally:
        await with_tier.close()
        await without.close()


def test_medium_survives_the_wire_and_vllm_cpu_events_stay_out_of_the_gpu_index() -> None:
    for ev in (BlockStored("r", (1, 2), "cpu"), BlockRemoved("r", (3,), "cpu"), BlockStored("r", (4,))):
        assert wire.event_from_pb("r", wire.event_to_pb(ev)) == ev
    seen: list[tuple[str, list[int]]] = []
    sub = KvEventSubscriber(
        "tcp://127.0.0.1:1",
        16,
        on_stored=lambda hs: seen.append(("stored", hs)),
        on_removed=lambda hs: seen.append(("removed", hs)),
        on_cleared=lambda: None,
    )
    import msgpack

    cpu = ["BlockStored", [11], None, list(range(16)), 16, None, "CPU", None]
    gpu = ["BlockStored", [12], None, list(range(16)), 16, None, "GPU", None]
    sub.handle(msgpack.packb([0.0, [cpu, gpu, ["BlockRemoved", [11], "CPU"]]]))
    assert [k for k, _ in seen] == ["stored"] and len(seen[0][1]) == 1  # only the GPU block
