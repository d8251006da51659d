"""``corral doctor``'s GPU and KubeRay-version verdicts on stub cluster reads (the whole command runs
against a real cluster, broken and healthy, in tests/integration/test_helm_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace as NS
from typing import Any

from corral.operator import doctor


def node(name: str, labels: dict[str, str], gpus: int) -> Any:
    return NS(metadata=NS(name=name, labels=labels), status=NS(allocatable={"nvidia.com/gpu": str(gpus)}))


def pool(classes: list[dict[str, Any]], models: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"models": [{"name": f"m{i}"} for i in range(models)], "gpuClasses": classes},
    }


class Stub:
    def __init__(self, nodes: list[Any], pools: list[dict[str, Any]]) -> None:
        self.core = NS(list_node=lambda: NS(items=nodes))
        self.custom = NS(list_cluster_custom_object=lambda *a: {"items": pools})


H100 = {"nvidia.com/gpu.product": "H100"}


def verdicts(nodes: list[Any], pools: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(f.level, f.message, f.fix) for f in doctor.check_gpus(Stub(nodes, pools))]  # type: ignore[arg-type]


def test_gpu_class_with_no_matching_node_fails_with_the_label_fix() -> None:
    ((level, msg, fix),) = verdicts([node("a", {}, 8)], [pool([{"name": "h100", "nodeSelector": H100}])])
    assert level == "FAIL" and "class h100" in msg and "no node matches" in msg
    assert fix == "kubectl label node <node> nvidia.com/gpu.product=H100"


def test_matching_nodes_without_gpus_fail_and_too_few_gpus_warn() -> None:
    ((level, msg, _),) = verdicts([node("a", H100, 0)], [pool([{"name": "h100", "nodeSelector": H100}])])
    assert level == "FAIL" and "none has allocatable nvidia.com/gpu" in msg
    cls = {"name": "h100", "nodeSelector": H100, "replicas": 3, "gpusPerReplica": 2}
    ((level, msg, _),) = verdicts([node("a", H100, 8)], [pool([cls], models=2)])
    assert level == "WARN" and "8 nvidia.com/gpu allocatable on 1 nodes, 12 wanted" in msg
    ((level, msg, _),) = verdicts([node("a", H100, 8), node("b", H100, 8)], [pool([cls], models=2)])
    assert level == "ok" and "16 nvidia.com/gpu on 2 nodes (wants 12)" in msg


def test_no_pools_reports_the_gpu_nodes() -> None:
    ((level, msg, _),) = verdicts([node("a", H100, 8), node("b", {}, 0)], [])
    assert level == "ok" and "1 nodes with 8 allocatable" in msg
    ((level, _msg, fix),) = verdicts([node("b", {}, 0)], [])
    assert level == "WARN" and "device plugin" in fix


def test_image_versions() -> None:
    assert doctor._image_version("quay.io/kuberay/operator:v1.5.0") == "v1.5.0"
    assert doctor._image_version("registry:5000/kuberay/operator") == "unknown"
    assert doctor._semver("v1.5.0") == (1, 5, 0) and doctor._semver("latest") is None


def test_apikeys_secret_checks_name_the_policy_secret_key_and_line() -> None:
    import base64

    from corral.router.server.auth import hash_key
    from kubernetes.client.exceptions import ApiException

    def rp(name: str, tenants: dict[str, Any] | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"poolRef": "p"} | ({"tenants": tenants} if tenants else {})
        return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    secrets = {
        "good": NS(data={"api-keys": b64(f"{hash_key('sk-1')}: tenant-a\n")}),
        "other-key": NS(data={"keys.yaml": b64("x")}),
        "plain": NS(data={"api-keys": b64("sk-plain-key: tenant-a\n")}),
    }

    def read_secret(name: str, ns: str) -> Any:
        if name not in secrets:
            raise ApiException(status=404)
        return secrets[name]

    policies = [
        rp("open", None),
        rp("a", {"secretRef": {"name": "good"}}),
        rp("b", {"secretRef": {"name": "missing"}}),
        rp("c", {"secretRef": {"name": "other-key"}}),
        rp("d", {"secretRef": {"name": "plain"}}),
    ]
    stub = NS(
        custom=NS(list_cluster_custom_object=lambda *a: {"items": policies}),
        core=NS(read_namespaced_secret=read_secret),
        maybe=doctor.Cluster.maybe,
    )
    got = [(f.level, f.message, f.fix) for f in doctor.check_apikeys(stub)]  # type: ignore[arg-type]
    assert [g[0] for g in got] == ["ok", "FAIL", "FAIL", "FAIL"]
    assert "ns/a" in got[0][1] and "holds 1 keys of 1 tenants" in got[0][1]
    assert "Secret 'missing' not found in namespace ns" in got[1][1] and "corral keys add" in got[1][2]
    assert "has no key 'api-keys' (has: keys.yaml)" in got[2][1]
    assert (
        "Secret ns/plain key api-keys:1: key: not a key digest" in got[3][1]
        and "sk-plain-key" not in got[3][1]
    )
