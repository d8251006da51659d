"""ModelPool + RoutingPolicy -> Serve deployments and Serve config (validated by Ray's own schema)."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from corral.router.server.auth import hash_key
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
    with pytest.raises(ValueError, match=r"ModelPool chat is invalid: spec\.models\[0\]\.engine: .*tgi"):
        plan_pool(bad)
    empty = copy.deepcopy(POOL)
    empty["spec"]["gpuClasses"] = []
    with pytest.raises(ValueError, match=r"spec\.gpuClasses: "):
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
    app = plan.serve_application()
    args = app["args"]
    again = plan_pool(args["pool"], POLICY, args["options"])
    # The builder's args hold only what engines are built from; Serve takes num_replicas and user_config
    # from the config's deployments (applied in place), so with those the plan is the same.
    overrides = {d["name"]: d for d in app["deployments"]}
    rebuilt = [
        {
            **d,
            "num_replicas": overrides[d["name"]]["num_replicas"],
            "user_config": overrides[d["name"]]["user_config"],
        }
        for d in again.deployment_schemas()
    ]
    assert rebuilt == plan.deployment_schemas()


def test_routine_pool_changes_stay_out_of_the_builder_args() -> None:
    """Replica counts and adapters are not in ``args`` (Serve hashes args into the code version: a change
    there restarts every replica); they reach the deployments through num_replicas and user_config."""
    args = plan_pool(POOL, POLICY).serve_application()["args"]
    pool = copy.deepcopy(POOL)
    pool["spec"]["gpuClasses"][0]["replicas"] = pool["spec"]["gpuClasses"][0]["maxReplicas"]
    pool["spec"]["adapters"] = pool["spec"]["adapters"][:1]
    changed = plan_pool(pool, POLICY)
    assert changed.serve_application()["args"] == args
    router = next(d for d in changed.deployment_schemas() if d["name"] == "router")
    assert [a["name"] for a in router["user_config"]["pool"]["spec"]["adapters"]] == [
        pool["spec"]["adapters"][0]["name"]
    ]


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


# ---- one translation: each CR field reaches the runtime ------------------------------------------------
ENGINE_KW: dict[str, Any] = dict(
    replica_id="s0", model="tiny", base_model="tiny", gpu_class="h100", profile="H100",
    block_size=16, max_loras=2, max_cpu_loras=2, engine_args={},
)  # fmt: skip


def test_max_model_len_is_passed_as_given_and_unset_means_the_engines_default() -> None:
    pool = copy.deepcopy(POOL)
    pool["spec"]["models"][0]["maxModelLen"] = 131072
    del pool["spec"]["models"][1]["maxModelLen"]
    plan = plan_pool(pool, POLICY)
    by = {e.name: e for e in plan.engines}
    assert by["engine-llama-8b-h100"].init_kwargs["max_model_len"] == 131072
    assert by["engine-tiny-h100"].init_kwargs["max_model_len"] is None  # not a made-up 8192
    assert plan.settings.models["llama-8b"].max_model_len == 131072
    assert plan.router.init_kwargs["models"][1] == {"name": "tiny", "maxModelLen": None}


async def test_sim_engine_runs_with_the_pools_max_model_len_or_its_own_default() -> None:
    from corral.serve.deployments import make_engine
    from corral.serve.endpoint.sim import SimEndpointEngine

    big = await make_engine("sim", max_model_len=131072, **ENGINE_KW)
    own = await make_engine("sim", max_model_len=None, **ENGINE_KW)
    try:
        assert big.info.max_model_len == 131072
        sim_default = inspect.signature(SimEndpointEngine.create).parameters["max_model_len"].default
        assert own.info.max_model_len == sim_default != 8192
    finally:
        await big.close()
        await own.close()


async def test_vllm_gets_max_model_len_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset maxModelLen is not passed to vLLM (which then uses the model's context length, 131072 for
    this stand-in); the replica reports the limit vLLM settled on."""
    from corral.serve import vllm_engine
    from corral.serve.deployments import make_engine

    seen: list[dict[str, Any]] = []

    class Args(dict):  # type: ignore[type-arg]
        def __init__(self, **kw: Any) -> None:
            super().__init__(kw)
            seen.append(kw)

    class LLM:
        def __init__(self, args: Args) -> None:
            mc = types.SimpleNamespace(max_model_len=args.get("max_model_len") or 131072)
            self.vllm_config = types.SimpleNamespace(
                cache_config=types.SimpleNamespace(num_gpu_blocks=10), model_config=mc
            )

        @classmethod
        def from_engine_args(cls, args: Args) -> LLM:
            return cls(args)

        def shutdown(self) -> None:
            pass

    api = vllm_engine.VllmApi(LLM, Args, None, None, None, None, dict)
    monkeypatch.setattr(vllm_engine, "import_vllm", lambda: api)
    monkeypatch.setattr(vllm_engine, "tokenizer_location", lambda *a, **k: "", raising=False)
    kw = {**ENGINE_KW, "engine_args": {"enforce_eager": True}}
    unset = await make_engine("vllm", max_model_len=None, **kw)
    given = await make_engine("vllm", max_model_len=4096, **kw)
    assert "max_model_len" not in seen[0] and seen[0]["enforce_eager"] is True  # engineArgs pass through
    assert seen[1]["max_model_len"] == 4096
    assert unset.info.max_model_len == 131072 and given.info.max_model_len == 4096
    await unset.close()
    await given.close()


def test_cpu_slots_unset_is_gpu_slots() -> None:
    pool = copy.deepcopy(POOL)
    pool["spec"]["adapterCache"] = {"gpuSlots": 3}
    plan = plan_pool(pool, POLICY)
    assert {(e.init_kwargs["max_loras"], e.init_kwargs["max_cpu_loras"]) for e in plan.engines} == {(3, 3)}
    assert plan.settings.paging.cpu_slots == 3


def test_node_selector_and_placement_are_in_the_plan() -> None:
    plan = plan_pool(POOL, POLICY)
    by = {e.name: e for e in plan.engines}
    assert by["engine-llama-8b-h100"].node_selector == {"gpu": "h100"}
    assert by["engine-llama-8b-a100"].node_selector == {}
    assert by["engine-llama-8b-a100"].ray_actor_options["resources"] == {gpu_class_resource("a100"): 2}


def test_tenants_without_an_api_keys_source_fail_the_plan(tmp_path: Path) -> None:
    policy = copy.deepcopy(POLICY)
    policy["spec"]["tenants"] = {"secretRef": {"name": "chat-keys"}, "isolateCache": True}
    with pytest.raises(ValueError, match=r"spec\.tenants .*no API keys source"):
        plan_pool(POOL, policy)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"{hash_key('sk-a')}: tenant-a\n")  # digests only
    plan = plan_pool(POOL, policy, ServeOptions(api_keys_file=str(keys)))
    assert plan.router.init_kwargs["api_keys_file"] == str(keys)
    assert plan.settings.isolate_tenants and plan.settings.tenant_secret == ("chat-keys", "api-keys")
    assert plan.router.user_config["policy"]["tenants"]["isolateCache"] is True


def test_block_size_reaches_engines_through_the_serve_builder_args() -> None:
    """The Serve builder never sees the policy (it is in the router's user_config only): the engines'
    block size travels in ``args``, so engines built from a Serve config use the policy's blockSize."""
    plan = plan_pool(POOL, POLICY)
    args = plan.serve_application()["args"]
    assert args["blockSize"] == 32 and "policy" not in args
    rebuilt = plan_pool(args["pool"], None, args["options"], block_size=args["blockSize"])
    assert {e.init_kwargs["block_size"] for e in rebuilt.engines} == {32}
    placement = [
        {k: v for k, v in d.items() if k not in ("num_replicas", "user_config")}
        for d in plan.deployment_schemas()
    ]
    assert placement == [
        {k: v for k, v in d.items() if k not in ("num_replicas", "user_config")}
        for d in rebuilt.deployment_schemas()
    ]


# ---- the Serve-deployed router, in process (no Ray): its settings come from the CRs ------------------


class _NoHeartbeat:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _no_registry(*a: Any, **k: Any) -> Any:
    raise RuntimeError("no registry in this test")


async def _post(url: str, body: dict[str, Any], key: str | None = None) -> tuple[int, dict[str, Any]]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_deployed_router_runs_with_the_crs_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenants (401 without a key), profileOverrides (the router's cost model), hotspotFactor (policy
    params), prefixIndex, maxQueueRequestsPerReplica and isolateCache reach a RouterDeployment replica,
    at start and on a live reconfigure."""
    from corral.router.engine_client import StaticDiscovery
    from corral.serve import deployments
    from corral.serve.deployments import RouterDeployment, make_engine
    from corral.serve.endpoint import EngineEndpoint

    engine = await make_engine(
        "sim", max_model_len=None, **{**ENGINE_KW, "model": "tiny", "gpu_class": "a100"}
    )
    ep = await EngineEndpoint.start(engine, "127.0.0.1", 0, sample_period_s=0.05)
    monkeypatch.setattr(deployments, "RayRegistryDiscovery", lambda *a, **k: StaticDiscovery([ep.address]))
    monkeypatch.setattr(deployments, "RegistryHeartbeat", _NoHeartbeat)
    monkeypatch.setattr(deployments, "aget_registry", _no_registry)
    monkeypatch.setattr(deployments, "_node_ip", lambda: "10.1.2.3")
    monkeypatch.setattr(deployments, "_node_id", lambda: "node-x")
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"{hash_key('sk-a')}: tenant-a\n")  # digests only
    pool = copy.deepcopy(POOL)
    pool["spec"]["gpuClasses"][1]["profileOverrides"] = {"b1Us": 99.5}
    policy = copy.deepcopy(POLICY)
    policy["spec"].update(
        prefixIndex="approximate",
        load={"hotspotFactor": 2.5, "maxQueueRequestsPerReplica": 7, "twoChoiceAbove": 4},
        tenants={"secretRef": {"name": "chat-keys"}, "isolateCache": True},
    )
    plan = plan_pool(pool, policy, ServeOptions(api_keys_file=str(keys), router_host="0.0.0.0",
                                                router_grpc_port=0, router_http_port=0,
                                                selection_state_dir=str(tmp_path / "bandits")))  # fmt: skip
    cls: Any = RouterDeployment.func_or_class
    r = cls.__new__(cls)
    await r.__init__(**plan.router.init_kwargs)
    try:
        await r.reconfigure(plan.router.user_config)
        await r.server.wait_for_replicas(1, timeout=10)
        got = r.router_settings()
        assert got["strategy"] == "corral"
        assert got["policy_params"] == {"ttft_slo_s": 0.5, "hotspot_c": 2.5, "narrow_above": 4}
        assert r.server.router.policy.params.hotspot_c == 2.5
        assert (got["index_mode"], got["fleet_index_mode"]) == ("approximate", "approximate")
        assert got["max_queue_per_replica"] == 7 and got["isolate_tenants"] and got["auth"]
        assert r.server.router.selection.store.dir == tmp_path / "bandits"  # ServeOptions.selection_state_dir
        assert got["adapters"] == ["sql", "tiny-chat"]
        (rep,) = r.server.fleet.replicas.values()
        assert rep.gpu_class == "a100" and rep.profile.name == "A100-80GB"
        assert rep.profile.b1_us == 99.5  # the pool's override, not the built-in 47.8 the engine names
        # advertised at the node's address (the router binds 0.0.0.0), on the ports it bound
        assert r.grpc_address.startswith("10.1.2.3:") and r.http_url.startswith("http://10.1.2.3:")
        local = "http://127.0.0.1:" + r.http_url.rsplit(":", 1)[1]
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 2}
        status, out = await _post(local + "/v1/completions", body)
        assert status == 401 and "API key" in out["error"]["message"]
        status, out = await _post(local + "/v1/completions", body, "sk-a")
        assert status == 200, out

        # live: another policy (no tenants, precise index, another strategy), same server and fleet
        server = r.server
        new = copy.deepcopy(POLICY)
        new["spec"]["strategy"] = "least_loaded"
        await r.reconfigure(plan_pool(pool, new).router.user_config)
        got = r.router_settings()
        assert r.server is server and got["strategy"] == "least_loaded" and got["policy_params"] == {}
        assert not got["auth"] and not got["isolate_tenants"] and got["fleet_index_mode"] == "precise"
        status, out = await _post(local + "/v1/completions", body)
        assert status == 200, out
        # a bad policy fails the reconfigure and changes nothing
        with pytest.raises(ValueError):
            await r.reconfigure({"policy": {**new["spec"], "strategy": "nope"}})
        assert r.router_settings()["strategy"] == "least_loaded"
    finally:
        await r.__del__()
        await ep.stop(None)
        await engine.close()


def test_cli_tenants_need_api_keys_one_line_errors(tmp_path: Path) -> None:
    """``corral serve`` refuses to serve a policy with tenants open, in one line; --api-keys fixes it."""
    import yaml

    policy = copy.deepcopy(POLICY)
    policy["spec"]["tenants"] = {"secretRef": {"name": "chat-keys"}}
    (tmp_path / "crs.yaml").write_text(yaml.safe_dump_all([POOL, policy]))
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"{hash_key('sk-a')}: tenant-a\n")  # digests only

    def serve(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "corral.api.cli",
            "serve",
            "-f",
            str(tmp_path / "crs.yaml"),
            "--print-config",
        ]
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)

    out = serve()
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "spec.tenants" in out.stderr and "--api-keys" in out.stderr
    out = serve("--api-keys", str(tmp_path / "missing.yaml"))
    assert out.returncode == 1 and out.stderr.startswith("corral serve: --api-keys "), out.stderr
    out = serve("--api-keys", str(keys))
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["applications"][0]["args"]["options"]["api_keys_file"] == str(keys.resolve())
