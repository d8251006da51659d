"""ModelPool + RoutingPolicy -> Serve deployments and Serve config (validated by Ray's own schema)."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
from corral.serve.app import (
    APP_BUILDER_IMPORT_PATH,
    ServeOptions,
    gpu_class_resource,
    plan_pool,
    serve_config,
)

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "chat", "namespace": "default"},
    "spec": {
        "models": [
            {"name": "llama-8b", "baseModel": "meta-llama/Llama-3.1-8B-Instruct", "engine": "vllm",
             "engineArgs": {"gpu_memory_utilization": 0.9}, "maxModelLen": 8192},
            {"name": "tiny", "baseModel": "tiny", "engine": "sim", "maxModelLen": 4096},
        ],
        "gpuClasses": [
            {"name": "h100", "gpusPerReplica": 1, "minReplicas": 2, "maxReplicas": 4, "replicas": 3,
             "profile": "H100", "acceleratorType": "H100", "nodeSelector": {"gpu": "h100"}},
            {"name": "a100", "gpusPerReplica": 2, "minReplicas": 1, "maxReplicas": 2, "profile": "A100-80GB",
             "profileOverrides": {"kvCapacityTokens": 100000, "b0Us": 1.5}},
        ],
        "adapters": [
            {"name": "sql", "baseModel": "llama-8b", "rank": 16, "source": "file:///a/sql"},
            {"name": "tiny-chat", "baseModel": "tiny", "rank": 8, "source": "s3://bucket/loras/tiny-chat"},
        ],
        "adapterCache": {"gpuSlots": 4, "cpuSlots": 16},
    },
}  # fmt: skip

POLICY: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "chat-routing"},
    "spec": {"poolRef": "chat", "strategy": "corral", "blockSize": 32, "ttftSloMs": 500,
             "adapterPaging": {"pin": ["sql"], "prefetchToCpu": True}},
}  # fmt: skip


def test_one_engine_deployment_per_model_and_class_plus_router() -> None:
    plan = plan_pool(POOL, POLICY)
    assert plan.app_name == "corral-chat" and plan.pool_id == "chat"
    names = [e.name for e in plan.engines]
    assert names == ["engine-llama-8b-h100", "engine-llama-8b-a100", "engine-tiny-h100", "engine-tiny-a100"]
    assert plan.router.name == "router" and plan.router.num_replicas == 1

    by = {e.name: e for e in plan.engines}
    v = by["engine-llama-8b-h100"]
    assert v.num_replicas == 3  # explicit replicas win over minReplicas
    assert v.ray_actor_options["num_gpus"] == 1
    assert v.ray_actor_options["accelerator_type"] == "H100"
    assert v.ray_actor_options["resources"] == {gpu_class_resource("h100"): 1}
    assert v.init_kwargs["engine"] == "vllm"
    assert v.init_kwargs["engine_args"] == {"gpu_memory_utilization": 0.9}
    assert v.init_kwargs["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (v.init_kwargs["max_loras"], v.init_kwargs["max_cpu_loras"]) == (4, 16)
    assert v.init_kwargs["block_size"] == 32  # from the RoutingPolicy: router and engines agree
    assert v.user_config == {"adapters": [POOL["spec"]["adapters"][0]]}

    a = by["engine-llama-8b-a100"]
    assert a.num_replicas == 1 and a.ray_actor_options["num_gpus"] == 2
    assert "accelerator_type" not in a.ray_actor_options
    assert a.init_kwargs["profile"] == "A100-80GB"
    assert a.init_kwargs["profile_overrides"] == {"kv_capacity_tokens": 100000, "b0_us": 1.5}

    s = by["engine-tiny-h100"]
    assert s.ray_actor_options["num_gpus"] == 0  # the simulator needs no GPU...
    assert s.ray_actor_options["resources"] == {gpu_class_resource("h100"): 1}  # ...but sits on its class
    assert "accelerator_type" not in s.ray_actor_options

    assert plan.router.user_config["policy"]["strategy"] == "corral"
    assert plan.router.user_config["policy"]["adapterPaging"]["pin"] == ["sql"]
    assert [a["name"] for a in plan.router.user_config["adapters"]] == ["sql", "tiny-chat"]
    assert plan.router.init_kwargs["models"] == [
        {"name": "llama-8b", "maxModelLen": 8192},
        {"name": "tiny", "maxModelLen": 4096},
    ]


def test_local_options_cap_replicas_and_say_so() -> None:
    plan = plan_pool(
        POOL, POLICY, ServeOptions(max_replicas_per_class=1, engine_num_cpus=0.1, router_replicas=2)
    )
    h = plan.engines[0]
    assert h.num_replicas == 1 and h.scaled_down_from == 3
    assert h.ray_actor_options["num_cpus"] == 0.1
    assert plan.router.num_replicas == 2
    assert any("scaled down from 3" in line for line in plan.summary())


def test_bad_pools_are_rejected() -> None:
    bad = copy.deepcopy(POOL)
    bad["spec"]["models"][0]["engine"] = "tgi"
    with pytest.raises(ValueError, match="unknown engine"):
        plan_pool(bad)
    empty = copy.deepcopy(POOL)
    empty["spec"]["gpuClasses"] = []
    with pytest.raises(ValueError, match="gpuClasses is empty"):
        plan_pool(empty)
    with pytest.raises(ValueError, match="unknown serve options"):
        plan_pool(POOL, POLICY, {"nope": 1})


def test_serve_config_validates_against_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = serve_config([plan_pool(POOL, POLICY)], http_options={"host": "0.0.0.0", "port": 8000})
    parsed = ServeDeploySchema.model_validate(cfg)
    app = parsed.applications[0]
    assert app.name == "corral-chat" and app.import_path == APP_BUILDER_IMPORT_PATH
    assert app.args["pool"]["metadata"]["name"] == "chat"
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {
        "engine-llama-8b-h100",
        "engine-llama-8b-a100",
        "engine-tiny-h100",
        "engine-tiny-a100",
        "router",
    }
    assert deps["engine-llama-8b-h100"].num_replicas == 3
    assert deps["router"].max_replicas_per_node == 1  # fixed router ports: one replica per node
    assert deps["engine-llama-8b-h100"].ray_actor_options.accelerator_type == "H100"
    router_cfg = deps["router"].user_config
    assert router_cfg is not None and router_cfg["policy"]["blockSize"] == 32


def test_serve_config_is_json_and_yaml_clean() -> None:
    import json

    import yaml

    cfg = serve_config(plan_pool(POOL, POLICY))
    assert json.loads(json.dumps(cfg)) == cfg
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_builder_args_round_trip_to_the_same_plan() -> None:
    plan = plan_pool(POOL, POLICY, ServeOptions(router_grpc_port=0, router_http_port=0))
    assert plan.router.max_replicas_per_node is None  # ephemeral ports: routers may share a node
    args = plan.serve_application()["args"]
    again = plan_pool(args["pool"], POLICY, args["options"])
    assert again.deployment_schemas() == plan.deployment_schemas()


def test_policy_change_keeps_the_code_version() -> None:
    """Serve restarts every replica when the app's code version (import_path + runtime_env + args)
    changes; a RoutingPolicy change must only touch the router's user_config."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    other = copy.deepcopy(POLICY)
    other["spec"]["strategy"] = "least_loaded"
    a = ServeDeploySchema.model_validate(serve_config(plan_pool(POOL, POLICY))).applications[0]
    b = ServeDeploySchema.model_validate(serve_config(plan_pool(POOL, other))).applications[0]
    assert get_app_code_version(a) == get_app_code_version(b)
    da = {d.name: d for d in a.deployments}
    db = {d.name: d for d in b.deployments}
    assert [n for n in da if da[n] != db[n]] == ["router"]


def test_pydantic_models_are_accepted() -> None:
    api = pytest.importorskip("corral.api.models", reason="corral.api models not present")
    pool = api.ModelPool.model_validate(POOL)
    policy = api.RoutingPolicy.model_validate(POLICY)
    plan = plan_pool(pool, policy)
    from_dicts = plan_pool(POOL, POLICY)
    assert [e.name for e in plan.engines] == [e.name for e in from_dicts.engines]
    for e, d in zip(plan.engines, from_dicts.engines, strict=True):
        assert e.num_replicas == d.num_replicas and e.ray_actor_options == d.ray_actor_options
        assert e.init_kwargs["profile_overrides"] == d.init_kwargs["profile_overrides"]
    assert plan.router.user_config["policy"]["adapterPaging"]["pin"] == ["sql"]


def test_builder_module_does_not_import_ray() -> None:
    code = "import sys, corral.serve.app; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_policy_spec_maps_onto_policy_params() -> None:
    from corral.serve.deployments import policy_from_spec

    spec = {"strategy": "corral", "ttftSloMs": 500, "load": {"hotspotFactor": 1.0, "twoChoiceAbove": 8}}
    name, params = policy_from_spec(spec)
    # hotspotFactor 1.0 is out of the corral policy's range (c > 1): left at its default, not an error.
    assert name == "corral" and params == {"ttft_slo_s": 0.5, "narrow_above": 8}
    assert policy_from_spec({"strategy": "round_robin", "ttftSloMs": 500}) == ("round_robin", {})
    with pytest.raises(ValueError):
        policy_from_spec({"strategy": "nope"})
