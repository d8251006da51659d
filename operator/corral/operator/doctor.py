"""``corral doctor``: check the cluster of the current kubeconfig for what Corral needs, and say how to fix
what is missing.

Checks, in order (each prints ``ok`` / ``WARN`` / ``FAIL`` and, when not ok, the fix):

* the API server answers (and its version);
* Corral's CRDs (ModelPool, RoutingPolicy) are installed, Established, serve ``corral.dev/v1alpha1``, and
  their schema is the one this Corral generates (an older chart/manifest is a WARN);
* KubeRay: its ``ray.io/v1`` CRDs (RayService, RayCluster) and its operator Deployment (found by
  KubeRay's chart labels or its image), available, and its version (from the image tag);
* GPUs: for every GPU class of every ModelPool, the nodes its ``nodeSelector`` matches and their
  allocatable ``nvidia.com/gpu`` against what the class asks for (``replicas x gpusPerReplica x models``);
  with no pools, the GPU nodes there are;
* the Corral operator Deployment (the chart's labels) is available;
* the admission webhook, when registered (ValidatingWebhookConfiguration ``corral.dev`` with webhooks):
  its Service has ready endpoints, or its URL accepts a TLS connection.

Exit status 0 when nothing FAILs (WARNs allowed), 1 otherwise, 2 when the cluster cannot be reached.
Needs only the ``kubernetes`` client (no kopf), read access to those objects.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

GPU = "nvidia.com/gpu"
CORRAL_CRDS = ("modelpools.corral.dev", "routingpolicies.corral.dev")
KUBERAY_CRDS = ("rayservices.ray.io", "rayclusters.ray.io")
KUBERAY_MIN = (1, 3)
WEBHOOK_CONFIGURATION = "corral.dev"  # corral.operator.admission.WEBHOOK_CONFIGURATION (no kopf import here)
OPERATOR_SELECTOR = "app.kubernetes.io/name=corral,app.kubernetes.io/component=operator"
KUBERAY_SELECTORS = (
    "app.kubernetes.io/name=kuberay-operator",
    "app.kubernetes.io/component=kuberay-operator",
)


@dataclass
class Finding:
    level: str  # ok | WARN | FAIL
    check: str
    message: str
    fix: str = ""


def _ok(check: str, message: str) -> Finding:
    return Finding("ok", check, message)


def _warn(check: str, message: str, fix: str = "") -> Finding:
    return Finding("WARN", check, message, fix)


def _fail(check: str, message: str, fix: str) -> Finding:
    return Finding("FAIL", check, message, fix)


class Cluster:
    """The few reads the doctor makes (``kubernetes`` client; 404 -> None)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core: Any = client.CoreV1Api(api_client)
        self.apps: Any = client.AppsV1Api(api_client)
        self.ext: Any = client.ApiextensionsV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self.admission: Any = client.AdmissionregistrationV1Api(api_client)
        self.discovery: Any = client.DiscoveryV1Api(api_client)
        self.version: Any = client.VersionApi(api_client)

    @staticmethod
    def maybe(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kw)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise


def _available(dep: Any) -> bool:
    return bool((dep.status.available_replicas or 0) >= 1)


def _image_version(image: str) -> str:
    tag = image.rsplit("@", 1)[0].rsplit(":", 1)
    return tag[1] if len(tag) == 2 and "/" not in tag[1] else "unknown"


def _semver(tag: str) -> tuple[int, ...] | None:
    parts = tag.lstrip("v").split("-")[0].split(".")
    try:
        return tuple(int(p) for p in parts[:3])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------ checks


def check_crds(c: Cluster) -> Iterator[Finding]:
    import yaml
    from corral.api import crdgen
    from corral.api.common import VERSION

    shipped = {d["metadata"]["name"]: d for d in (yaml.safe_load(t) for t in crdgen.render_all().values())}
    fix = (
        "helm upgrade --install corral charts/corral -n corral-system "
        "(or: corral crds | kubectl apply --server-side -f -)"
    )
    for name in CORRAL_CRDS:
        crd = c.maybe(c.ext.read_custom_resource_definition, name)
        if crd is None:
            yield _fail("crds", f"CRD {name} is not installed", fix)
            continue
        established = any(
            cond.type == "Established" and cond.status == "True" for cond in crd.status.conditions or []
        )
        served = [v.name for v in crd.spec.versions if v.served]
        if not established:
            yield _fail("crds", f"CRD {name} is not Established", f"kubectl describe crd {name}")
        elif VERSION not in served:
            yield _fail("crds", f"CRD {name} serves {served}, this Corral needs {VERSION}", fix)
        else:
            live = c.api_client.sanitize_for_serialization(crd.spec.versions)
            want = shipped[name]["spec"]["versions"]
            same = [v.get("schema") for v in live] == [v.get("schema") for v in want]
            if same:
                yield _ok("crds", f"CRD {name} ({VERSION}) matches this Corral")
            else:
                yield _warn("crds", f"CRD {name} ({VERSION}) has a different schema than this Corral's", fix)


def check_kuberay(c: Cluster) -> Iterator[Finding]:
    fix_crds = "install KubeRay: helm install kuberay-operator kuberay/kuberay-operator --version 1.5.0"
    for name in KUBERAY_CRDS:
        crd = c.maybe(c.ext.read_custom_resource_definition, name)
        if crd is None:
            yield _fail("kuberay", f"CRD {name} is not installed", fix_crds)
        elif "v1" not in [v.name for v in crd.spec.versions if v.served]:
            yield _fail("kuberay", f"CRD {name} does not serve ray.io/v1 (KubeRay too old)", fix_crds)
        else:
            yield _ok("kuberay", f"CRD {name} (ray.io/v1)")
    deps: dict[tuple[str, str], Any] = {}
    for sel in KUBERAY_SELECTORS:
        for d in c.apps.list_deployment_for_all_namespaces(label_selector=sel).items:
            deps[d.metadata.namespace, d.metadata.name] = d
    if not deps:  # installed some other way: look for its image
        for d in c.apps.list_deployment_for_all_namespaces().items:
            if any("kuberay/operator" in (ct.image or "") for ct in d.spec.template.spec.containers):
                deps[d.metadata.namespace, d.metadata.name] = d
    if not deps:
        yield _fail("kuberay", "no KubeRay operator Deployment found", fix_crds)
        return
    for (ns, name), d in sorted(deps.items()):
        image = next(
            (ct.image for ct in d.spec.template.spec.containers if "operator" in (ct.image or "")), ""
        )
        version = _image_version(image or d.spec.template.spec.containers[0].image or "")
        sv = _semver(version)
        where = f"KubeRay operator {ns}/{name} {version}"
        if not _available(d):
            yield _fail("kuberay", f"{where} is not available", f"kubectl -n {ns} describe deployment {name}")
        elif sv is not None and sv[:2] < KUBERAY_MIN:
            need = ".".join(map(str, KUBERAY_MIN))
            yield _warn("kuberay", f"{where}: Corral is tested with KubeRay >= {need}", "upgrade KubeRay")
        else:
            yield _ok("kuberay", f"{where} available")


def _pools(c: Cluster) -> list[dict[str, Any]]:
    from corral.api.common import GROUP, VERSION

    try:
        out = c.custom.list_cluster_custom_object(GROUP, VERSION, "modelpools")
    except Exception:  # no CRD: reported by check_crds
        return []
    return list(out.get("items", []))


def _gpus(node: Any) -> int:
    raw = (node.status.allocatable or {}).get(GPU, "0")
    try:
        return int(raw)
    except ValueError:
        return 0


def _matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    return all((labels or {}).get(k) == v for k, v in selector.items())


def check_gpus(c: Cluster) -> Iterator[Finding]:
    nodes = c.core.list_node().items
    gpu_nodes = [n for n in nodes if _gpus(n) > 0]
    pools = _pools(c)
    if not pools:
        total = sum(_gpus(n) for n in gpu_nodes)
        if gpu_nodes:
            yield _ok("gpus", f"no ModelPools yet; {len(gpu_nodes)} nodes with {total} allocatable {GPU}")
        else:
            yield _warn(
                "gpus",
                f"no node has allocatable {GPU}",
                "install the NVIDIA device plugin / GPU operator (engine: sim pools need no GPU)",
            )
        return
    for pool in pools:
        meta, spec = pool["metadata"], pool.get("spec") or {}
        pname = f"{meta.get('namespace')}/{meta['name']}"
        n_models = max(1, len(spec.get("models") or []))
        for gc in spec.get("gpuClasses") or []:
            selector = gc.get("nodeSelector") or {}
            matched = [n for n in nodes if _matches(n.metadata.labels, selector)]
            have = sum(_gpus(n) for n in matched)
            replicas = gc.get("replicas", gc.get("minReplicas", 1))
            need = int(replicas) * int(gc.get("gpusPerReplica", 1)) * n_models
            what = f"pool {pname} class {gc['name']} (nodeSelector {selector})"
            label_fix = "kubectl label node <node> " + " ".join(f"{k}={v}" for k, v in selector.items())
            if not matched:
                yield _fail("gpus", f"{what}: no node matches", label_fix)
            elif have == 0:
                yield _fail(
                    "gpus",
                    f"{what}: {len(matched)} nodes match but none has allocatable {GPU}",
                    "install the NVIDIA device plugin on those nodes",
                )
            elif have < need:
                yield _warn(
                    "gpus",
                    f"{what}: {have} {GPU} allocatable on {len(matched)} nodes, {need} wanted",
                    "add GPU nodes with those labels or lower the class's replicas",
                )
            else:
                yield _ok("gpus", f"{what}: {have} {GPU} on {len(matched)} nodes (wants {need})")


def check_operator(c: Cluster) -> Iterator[Finding]:
    deps = c.apps.list_deployment_for_all_namespaces(label_selector=OPERATOR_SELECTOR).items
    fix = "helm install corral charts/corral -n corral-system --create-namespace"
    if not deps:
        yield _fail("operator", "no Corral operator Deployment (labels " + OPERATOR_SELECTOR + ")", fix)
        return
    for d in deps:
        ns, name = d.metadata.namespace, d.metadata.name
        image = d.spec.template.spec.containers[0].image
        if _available(d):
            yield _ok("operator", f"Corral operator {ns}/{name} ({image}) available")
        else:
            yield _fail(
                "operator",
                f"Corral operator {ns}/{name} ({image}) is not available",
                f"kubectl -n {ns} describe deployment {name}; kubectl -n {ns} logs deployment/{name}",
            )


def _tls_connects(url: str, ca_bundle: bytes | None, timeout: float = 3.0) -> str | None:
    """None when ``url`` accepts a TLS connection verified by ``ca_bundle``; else why not."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname or "", parsed.port or 443
    ctx = ssl.create_default_context(cadata=ca_bundle.decode() if ca_bundle else None)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except (OSError, ssl.SSLError) as exc:
        return str(exc)


def check_webhook(c: Cluster) -> Iterator[Finding]:
    import base64

    cfg = c.maybe(c.admission.read_validating_webhook_configuration, WEBHOOK_CONFIGURATION)
    hooks = (cfg.webhooks or []) if cfg is not None else []
    if not hooks:
        yield _ok("webhook", "admission webhook not registered (optional: webhook.enabled / --webhook)")
        return
    for h in hooks:
        cc = h.client_config
        if cc.service is not None:
            svc = cc.service
            slices = c.discovery.list_namespaced_endpoint_slice(
                svc.namespace, label_selector=f"kubernetes.io/service-name={svc.name}"
            ).items
            ready = sum(
                1 for s in slices for e in s.endpoints or [] if e.conditions is None or e.conditions.ready
            )
            if ready:
                yield _ok(
                    "webhook", f"{h.name}: service {svc.namespace}/{svc.name} has {ready} ready endpoints"
                )
            else:
                yield _fail(
                    "webhook",
                    f"{h.name}: service {svc.namespace}/{svc.name} has no ready endpoints",
                    "check the operator pod (webhook.enabled needs it running)",
                )
            continue
        ca = base64.b64decode(cc.ca_bundle) if isinstance(cc.ca_bundle, str) else cc.ca_bundle
        why = _tls_connects(cc.url or "", ca)
        if why is None:
            yield _ok("webhook", f"{h.name}: {cc.url} answers TLS")
        else:
            level = _fail if h.failure_policy == "Fail" else _warn
            yield level(
                "webhook",
                f"{h.name}: {cc.url} unreachable from here ({why}); failurePolicy {h.failure_policy}",
                "check the operator's --webhook-host / the webhook Service (the apiserver must reach it)",
            )


def check_apikeys(c: Cluster) -> Iterator[Finding]:
    """Every RoutingPolicy with ``spec.tenants``: its Secret exists, holds the key, and the key file parses
    as the routers will parse it (else the Ray pods never start, or the routers refuse to serve)."""
    import base64

    from corral.api.common import GROUP, VERSION
    from corral.router.server.auth import KeyFileError, parse_key_file

    try:
        policies = c.custom.list_cluster_custom_object(GROUP, VERSION, "routingpolicies").get("items", [])
    except Exception:  # no CRD: reported by check_crds
        return
    for rp in policies:
        tenants = (rp.get("spec") or {}).get("tenants")
        if not tenants:
            continue
        ns, name = rp["metadata"].get("namespace", "default"), rp["metadata"]["name"]
        ref = tenants.get("secretRef") or {}
        secret, key = ref.get("name", ""), ref.get("key", "api-keys")
        where = f"RoutingPolicy {ns}/{name}: spec.tenants.secretRef"
        make = (
            f"corral keys add keys.yaml --tenant TENANT && kubectl create secret generic {secret} -n {ns} "
            f"--from-file={key}=keys.yaml"
        )
        obj = c.maybe(c.core.read_namespaced_secret, secret, ns)
        if obj is None:
            yield _fail("apikeys", f"{where}: Secret {secret!r} not found in namespace {ns}", make)
            continue
        data = (obj.data or {}).get(key)
        if data is None:
            have = ", ".join(sorted(obj.data or {})) or "nothing"
            yield _fail("apikeys", f"{where}: Secret {secret!r} has no key {key!r} (has: {have})", make)
            continue
        try:
            table = parse_key_file(base64.b64decode(data).decode("utf-8"), f"Secret {ns}/{secret} key {key}")
        except (KeyFileError, UnicodeDecodeError, ValueError) as e:
            yield _fail(
                "apikeys", f"{where}: {e}", "fix the file (`corral keys check FILE`) and update the Secret"
            )
            continue
        yield _ok(
            "apikeys",
            f"{where}: Secret {secret!r} holds {len(table.principals)} keys of {len(table.tenants)} tenants",
        )


CHECKS: tuple[Callable[[Cluster], Iterator[Finding]], ...] = (
    check_crds,
    check_kuberay,
    check_gpus,
    check_operator,
    check_webhook,
    check_apikeys,
)


def diagnose(api_client: Any) -> list[Finding]:
    c = Cluster(api_client)
    out: list[Finding] = []
    for check in CHECKS:
        try:
            out += list(check(c))
        except Exception as exc:  # a check that cannot even read its objects (RBAC, ...)
            name = check.__name__.removeprefix("check_")
            out.append(_fail(name, f"could not check: {exc.__class__.__name__}: {exc}", "check your access"))
    return out


def run(args: argparse.Namespace) -> int:
    from kubernetes import config

    try:
        api_client = config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
        version = Cluster(api_client).version.get_code()
    except Exception as exc:
        print(f"FAIL  cluster   cannot reach the API server: {exc}", file=sys.stdout)
        print("      fix: check KUBECONFIG / --kubeconfig / --context")
        return 2
    print(f"ok    cluster   {api_client.configuration.host} (Kubernetes {version.git_version})")
    findings = diagnose(api_client)
    for f in findings:
        print(f"{f.level:<5} {f.check:<9} {f.message}")
        if f.fix and f.level != "ok":
            print(f"      fix: {f.fix}")
    failed = sum(f.level == "FAIL" for f in findings)
    warned = sum(f.level == "WARN" for f in findings)
    print(f"{'healthy' if not failed else 'broken'}: {failed} failed, {warned} warnings")
    return 1 if failed else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="Check a cluster for what Corral needs (CRDs, KubeRay, GPUs, operator, webhook).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG / ~/.kube/config)"
    )
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.set_defaults(func=run)
    return p
