"""Thin Kubernetes API helpers for the operator (sync ``kubernetes`` client; kopf runs sync handlers in
threads). Server-side apply under one field manager, reads that map 404 to None, status conditions."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "corral-operator"
GROUP, VERSION = "corral.dev", "v1alpha1"
POOLS, POLICIES = "modelpools", "routingpolicies"
RAY_GROUP, RAY_VERSION = "ray.io", "v1"
RAYSERVICES, RAYCLUSTERS = "rayservices", "rayclusters"
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


class Kube:
    """The few API calls the operator makes, against one ``ApiClient``."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)

    def get(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(obj)  # type: ignore[call-overload]

    def list(
        self, group: str, version: str, plural: str, namespace: str, selector: str | None = None
    ) -> list[dict[str, Any]]:
        out: Any = self.custom.list_namespaced_custom_object(
            group, version, namespace, plural, label_selector=selector or ""
        )
        return list(out.get("items", []))

    def apply(
        self, group: str, version: str, plural: str, obj: Mapping[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """Server-side apply (field manager ``corral-operator``, conflicts forced: the operator owns
        what it generates)."""
        meta = obj["metadata"]
        kw: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True}
        if dry_run:
            kw["dry_run"] = "All"
        # raw response: the generated client maps only 200 for PATCH and returns None on 201 (created)
        resp: Any = self.custom.patch_namespaced_custom_object(
            group,
            version,
            meta["namespace"],
            plural,
            meta["name"],
            dict(obj),
            _content_type="application/apply-patch+yaml",
            _preload_content=False,
            **kw,
        )
        return dict(json.loads(resp.data))

    def json_patch(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        ops: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any]:
        out: Any = self.custom.patch_namespaced_custom_object(
            group,
            version,
            namespace,
            plural,
            name,
            [dict(op) for op in ops],
            field_manager=FIELD_MANAGER,
            _content_type="application/json-patch+json",
        )
        return dict(out)

    def patch_status(
        self, group: str, version: str, plural: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                group,
                version,
                namespace,
                plural,
                name,
                {"status": dict(status)},
                field_manager=FIELD_MANAGER,
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete(self, group: str, version: str, plural: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(
                group, version, namespace, plural, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def ensure_peering(k: Kube, name: str, namespaces: Sequence[str], *, clusterwide: bool) -> None:
    """Create kopf's peering object ``name`` (a ClusterKopfPeering with ``clusterwide``, else a KopfPeering
    in each namespace) unless it exists: kopf peers only through an existing object. RuntimeError when
    the peering CRDs (manifests/third_party/kopf/) are not installed."""
    body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "metadata": {"name": name}}
    calls: list[Any] = []
    if clusterwide:
        cluster_body = {**body, "kind": "ClusterKopfPeering"}
        calls.append(lambda: k.custom.create_cluster_custom_object(
            PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", cluster_body))  # fmt: skip
    for ns in namespaces:
        ns_body = {**body, "kind": "KopfPeering"}
        calls.append(lambda ns=ns, b=ns_body: k.custom.create_namespaced_custom_object(
            PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings", b))  # fmt: skip
    for call in calls:
        try:
            call()
        except ApiException as exc:
            if exc.status == 404:
                raise RuntimeError(
                    "--peering needs kopf's peering CRDs: kubectl apply -f manifests/third_party/kopf/"
                ) from exc
            if exc.status != 409:
                raise


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: bool, reason: str, message: str = "", *, generation: int | None = None
) -> dict[str, Any]:
    c: dict[str, Any] = {"type": type_, "status": "True" if status else "False", "reason": reason}
    c["message"] = message
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def merge_conditions(
    old: Sequence[Mapping[str, Any]] | None, new: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """New conditions with ``lastTransitionTime`` carried over from ``old`` when the status did not flip."""
    before = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        prev = before.get(c["type"])
        t = prev.get("lastTransitionTime") if prev and prev.get("status") == c["status"] else None
        out.append({**c, "lastTransitionTime": t or now()})
    return out
