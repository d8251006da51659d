"""One translation from the CRs to the runtime: every ModelPool and RoutingPolicy field reaches the router
settings (``corral.router.settings.router_settings``) or the Serve plan (``corral.serve.app.plan_pool``), or
is rejected at validation. The field tables below must list every field of the API models, so a new field
that nothing reads fails here."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from corral.api.admission import AdmissionSpec, TenantAdmission, TenantLimits
from corral.api.modelpool import (
    Adapter,
    AdapterCache,
    GpuClass,
    KvOffload,
    ModelPool,
    ModelPoolSpec,
    ModelSpec,
)
from corral.api.routingpolicy import (
    STRATEGIES,
    AdapterPaging,
    LoadSpec,
    RoutingPolicy,
    RoutingPolicySpec,
    Tenants,
)
from corral.api.selection import ModelSelection
from corral.router.policies import make_policy
from corral.router.settings import RouterSettings, policy_params, router_settings
from corral.serve.app import ServeOptions, plan_pool

POOL: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "ModelPool",
    "metadata": {"name": "chat"},
    "spec": {
        "models": [{"name": "llama", "baseModel": "org/llama", "engine": "vllm"}],
        "gpuClasses": [{"name": "h100", "maxReplicas": 4, "profile": "H100"}],
        "adapters": [{"name": "sql", "baseModel": "llama", "source": "file:///a/sql"}],
    },
}
POLICY: dict[str, Any] = {
    "apiVersion": "corral.dev/v1alpha1",
    "kind": "RoutingPolicy",
    "metadata": {"name": "chat"},
    "spec": {"poolRef": "chat"},
}
OPTIONS = ServeOptions(api_keys_file="/keys.yaml")  # a keys source, so tenants can be set

# (field path in the CR, a non-default value) for every field; a change must show in the plan or settings
POOL_FIELDS: dict[str, Any] = {
    "models[0].name": "llama-2",
    "models[0].baseModel": "org/other",
    "models[0].engine": "sim",
    "models[0].engineArgs": {"enforce_eager": True},
    "models[0].maxModelLen": 131072,
    "models[0].tokenizer": "file:///tok/tokenizer.json",
    "gpuClasses[0].name": "h200",
    "gpuClasses[0].nodeSelector": {"nvidia.com/gpu.product": "H100"},
    "gpuClasses[0].gpusPerReplica": 2,
    "gpuClasses[0].minReplicas": 2,
    "gpuClasses[0].replicas": 3,
    "gpuClasses[0].profile": "L4",
    "gpuClasses[0].profileOverrides": {"b1Us": 20.0},
    "gpuClasses[0].acceleratorType": "H100",
    "adapters[0].name": "sql-2",
    "adapters[0].rank": 32,
    "adapters[0].source": "file:///b/sql",
    "adapters[0].tenant": "tenant-a",
    "adapterCache.gpuSlots": 2,
    "adapterCache.cpuSlots": 9,
    "kvOffload.cpuGib": 16.0,
    "kvOffload.backend": "lmcache",
}
POOL_FIELDS_ELSEWHERE = {
    "gpuClasses[0].maxReplicas": "the operator's scaling bound (the plan runs replicas, else minReplicas)",
    "adapters[0].baseModel": "must name a model: with one model it cannot change alone",
    "routingPolicyRef": "pairs the pool with its policy (corral.serve.manifests); the plan receives the pair",
}
ADMISSION_LIMITS = {"weight": 3, "requestsPerSecond": 2.0, "burstRequests": 4, "tokensPerSecond": 100.0,
                    "burstTokens": 500, "maxConcurrency": 2}  # fmt: skip
POLICY_FIELDS: dict[str, Any] = {
    "strategy": "least_loaded",
    "blockSize": 32,
    "prefixIndex": "approximate",
    "ttftSloMs": 800,
    "load.maxQueueRequestsPerReplica": 7,
    "load.hotspotFactor": 2.5,
    "load.twoChoiceAbove": 4,
    "adapterPaging.pin": ["sql"],
    "adapterPaging.prefetchToCpu": False,
    "adapterPaging.replicationDemandRps": 2.0,
    "tenants": {"secretRef": {"name": "keys"}},
    "tenants.secretRef.key": "other-key",
    "tenants.isolateCache": True,
    "admission.maxWaiting": 5,
    "admission.maxWaitMs": 250.0,
    **{f"admission.{t}.{k}": v for t in ("defaultTenant", "tenants[0]") for k, v in ADMISSION_LIMITS.items()},
    "admission.tenants[0].name": "other",
    "modelSelection.model": "pick",
    "modelSelection.signals": [{"name": "code", "keywords": ["def"]}],
    "modelSelection.rules": [{"name": "code", "when": {"signal": "code"}, "target": "sql"}],
    "modelSelection.default": "llama",
}
POLICY_FIELDS_ELSEWHERE = {
    "poolRef": "pairs the policy with its pool",
}


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    parts = path.replace("]", "").replace("[", ".").split(".")
    obj: Any = doc
    for p in parts[:-1]:
        obj = obj[int(p)] if p.isdigit() else obj.setdefault(p, {})
    obj[parts[-1]] = value


def _fingerprint(pool: dict[str, Any], policy: dict[str, Any]) -> tuple[Any, ...]:
    plan = plan_pool(pool, policy, OPTIONS)
    engines = [(e.name, e.num_replicas, e.ray_actor_options, e.init_kwargs, e.user_config, e.node_selector)
               for e in plan.engines]  # fmt: skip
    return repr(engines), repr(plan.settings), repr(plan.router.user_config)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _fields(model: Any, prefix: str) -> set[str]:
    return {prefix + _camel(n) for n in model.model_fields}


def test_the_field_tables_cover_every_api_field() -> None:
    pool_fields = (
        _fields(ModelSpec, "models[0].")
        | _fields(GpuClass, "gpuClasses[0].")
        | _fields(Adapter, "adapters[0].")
        | _fields(AdapterCache, "adapterCache.")
        | _fields(KvOffload, "kvOffload.")
        | {
            f
            for f in _fields(ModelPoolSpec, "")
            if f not in ("models", "gpuClasses", "adapters", "adapterCache", "kvOffload")
        }
    )
    assert pool_fields == set(POOL_FIELDS) | set(POOL_FIELDS_ELSEWHERE)
    policy_fields = (
        {f for f in _fields(RoutingPolicySpec, "") if f not in ("load", "adapterPaging", "modelSelection")}
        | _fields(LoadSpec, "load.")
        | _fields(AdapterPaging, "adapterPaging.")
        | _fields(ModelSelection, "modelSelection.")
        | {"tenants.secretRef.key"}
        | _fields(Tenants, "tenants.") - {"tenants.secretRef"}
        | _fields(AdmissionSpec, "admission.") - {"admission.defaultTenant", "admission.tenants"}
        | _fields(TenantLimits, "admission.defaultTenant.")
        | _fields(TenantAdmission, "admission.tenants[0].")
    ) - {"admission"}
    assert policy_fields == set(POLICY_FIELDS) | set(POLICY_FIELDS_ELSEWHERE)


@pytest.mark.parametrize("path", sorted(POOL_FIELDS))
def test_each_pool_field_changes_the_runtime(path: str) -> None:
    base = _fingerprint(POOL, POLICY)
    pool = copy.deepcopy(POOL)
    if path.startswith("gpuClasses[0].replicas") or path.startswith("gpuClasses[0].minReplicas"):
        pool["spec"]["gpuClasses"][0]["maxReplicas"] = 8
        base = _fingerprint(pool, POLICY)
    if path == "models[0].name":
        pool["spec"]["adapters"][0]["baseModel"] = POOL_FIELDS[path]
    _set(pool["spec"], path, POOL_FIELDS[path])
    changed = _fingerprint(pool, POLICY)
    assert changed != base, path


@pytest.mark.parametrize("path", sorted(POLICY_FIELDS))
def test_each_policy_field_changes_the_router_settings(path: str) -> None:
    policy = copy.deepcopy(POLICY)
    base_policy = copy.deepcopy(POLICY)
    if path.startswith("tenants."):  # sub-fields of tenants: compare against tenants at its defaults
        base_policy["spec"]["tenants"] = {"secretRef": {"name": "keys"}}
        policy["spec"]["tenants"] = {"secretRef": {"name": "keys"}}
    if path == "modelSelection.rules":  # rules need their signals and a default
        sel = {k.split(".")[1]: v for k, v in POLICY_FIELDS.items() if k.startswith("modelSelection.")}
        policy["spec"]["modelSelection"] = dict(sel)
        base_policy["spec"]["modelSelection"] = {k: v for k, v in sel.items() if k != "rules"}
    if path.startswith("admission."):  # a burst needs its rate; tenants[0] needs to exist
        for p in (policy, base_policy):
            _admission_base(p, path)
    _set(policy["spec"], path, POLICY_FIELDS[path])
    assert _fingerprint(POOL, policy) != _fingerprint(POOL, base_policy), path


def _admission_base(policy: dict[str, Any], path: str) -> None:
    adm = policy["spec"].setdefault("admission", {})
    adm["tenants"] = [{"name": "a"}]
    if path.startswith("admission.defaultTenant"):
        obj = adm["defaultTenant"] = {}
    else:
        obj = adm["tenants"][0]
    if path.endswith("burstRequests"):
        obj["requestsPerSecond"] = 1.0
    if path.endswith("burstTokens"):
        obj["tokensPerSecond"] = 1.0


def test_every_policy_field_lands_where_it_should() -> None:
    policy = copy.deepcopy(POLICY)
    policy["spec"]["admission"] = {"tenants": [{"name": "a"}]}
    for path, value in POLICY_FIELDS.items():
        if path != "strategy":
            _set(policy["spec"], path, value)
    s = router_settings(RoutingPolicy.model_validate(policy), ModelPool.model_validate(POOL))
    assert s.strategy == "corral"
    assert dict(s.policy_params) == {"ttft_slo_s": 0.8, "hotspot_c": 2.5, "narrow_above": 4}
    assert (s.index_mode, s.block_size, s.ttft_slo_s, s.max_queue_per_replica) == ("approximate", 32, 0.8, 7)
    assert s.isolate_tenants and s.tenant_secret == ("keys", "other-key")
    p = s.paging
    assert (p.pin, p.prefetch_to_cpu, p.replication_demand_rps) == (("sql",), False, 2.0)
    assert (s.selection.model, s.selection.rules[0].target, s.selection.default) == ("pick", "sql", "llama")
    adm = s.admission
    assert (adm.max_waiting, adm.max_wait_ms, adm.tenants[0].name) == (5, 250.0, "other")
    for lim in (adm.default_tenant, adm.limits("other")):
        assert lim.model_dump(by_alias=True, exclude={"name"}) == ADMISSION_LIMITS


def test_pool_fields_reach_the_router_settings() -> None:
    pool = copy.deepcopy(POOL)
    pool["spec"]["models"][0].update(maxModelLen=131072, tokenizer="file:///tok")
    pool["spec"]["gpuClasses"][0]["profileOverrides"] = {"b1Us": 20.0, "kvCapacityTokens": 1000}
    pool["spec"]["adapterCache"] = {"gpuSlots": 3}
    s = router_settings(None, ModelPool.model_validate(pool))
    assert s.models["llama"].max_model_len == 131072 and s.models["llama"].tokenizer == "file:///tok"
    assert s.profiles["h100"].b1_us == 20.0 and s.profiles["h100"].kv_capacity_tokens == 1000
    assert s.profiles["h100"].b0_us == 5753.0  # the rest of the built-in H100 profile
    assert (s.paging.gpu_slots, s.paging.cpu_slots) == (3, 3)  # cpuSlots unset = gpuSlots
    assert s.adapters["sql"].base_model == "llama" and s.adapters["sql"].rank == 16
    assert router_settings(None, ModelPool.model_validate(POOL)).models["llama"].max_model_len is None


def test_defaults_are_the_crds() -> None:
    s = router_settings(None, ModelPool.model_validate(POOL))
    spec = RoutingPolicySpec(pool_ref="chat")
    assert s == RouterSettings(
        models=s.models, adapters=s.adapters, profiles=s.profiles, paging=s.paging
    )  # the dataclass defaults are the CRD's
    assert (s.strategy, s.index_mode, s.block_size) == (spec.strategy, spec.prefix_index, spec.block_size)
    assert s.max_queue_per_replica == spec.load.max_queue_requests_per_replica
    assert s.policy_params["hotspot_c"] == spec.load.hotspot_factor and s.tenant_secret is None


def _bounds(model: Any, name: str) -> tuple[float, float]:
    lo = hi = None
    for m in model.model_fields[name].metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        lo = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
    assert lo is not None and hi is not None, name
    return float(lo), float(hi)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_accepts_the_knobs_at_the_crd_bounds(strategy: str) -> None:
    """What the CRD accepts, the policy accepts: the knobs at their CRD bounds build the policy."""
    h_lo, h_hi = _bounds(LoadSpec, "hotspot_factor")
    t_lo, t_hi = _bounds(LoadSpec, "two_choice_above")
    s_lo, s_hi = _bounds(RoutingPolicySpec, "ttft_slo_ms")
    for hotspot, two, slo in ((h_lo + 1e-6, int(t_lo), s_lo + 1e-3), (h_hi, int(t_hi), s_hi)):
        spec = RoutingPolicySpec.model_validate(
            {"poolRef": "p", "strategy": strategy, "ttftSloMs": slo,
             "load": {"hotspotFactor": hotspot, "twoChoiceAbove": two}}
        )  # fmt: skip
        name, params = policy_params(spec)
        make_policy(name, **params)
