"""Prometheus metrics of one router (``corral_*``), in a registry of its own (several routers may share a
process in tests). Per-replica gauges are read from :class:`FleetState` at scrape time, so the request path
pays only for counters and histograms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..state import FleetState

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _FleetCollector(Collector):
    def __init__(self, metrics: RouterMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        fleet = self.m.fleet
        outstanding = GaugeMetricFamily(
            "corral_replica_outstanding",
            "Requests this router has in flight on a replica",
            labels=["replica"],
        )
        queue = GaugeMetricFamily(
            "corral_replica_queue",
            "Waiting requests reported by the replica's last load sample",
            labels=["replica"],
        )
        running = GaugeMetricFamily(
            "corral_replica_running",
            "Running requests reported by the replica's last load sample",
            labels=["replica"],
        )
        kv = GaugeMetricFamily(
            "corral_replica_kv_usage", "KV cache usage (0..1) last reported", labels=["replica"]
        )
        healthy = GaugeMetricFamily(
            "corral_replica_healthy", "1 if the replica is routable", labels=["replica", "model", "gpu_class"]
        )
        for rid, r in sorted(fleet.replicas.items()):
            outstanding.add_metric([rid], r.outstanding)
            s = r.last_sample
            queue.add_metric([rid], s.waiting if s else 0)
            running.add_metric([rid], s.running if s else 0)
            kv.add_metric([rid], s.kv_usage if s else 0.0)
            healthy.add_metric([rid, r.model, r.gpu_class], 1.0 if r.healthy else 0.0)
        yield from (outstanding, queue, running, kv, healthy)
        pol = GaugeMetricFamily("corral_router_policy", "The active routing policy (1)", labels=["policy"])
        pol.add_metric([self.m.policy_name], 1.0)
        yield pol


class RouterMetrics:
    def __init__(self, fleet: FleetState, policy_name: str = "") -> None:
        self.fleet = fleet
        self.policy_name = policy_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "corral_decisions", "Routing decisions", ["policy", "replica", "gpu_class"], registry=r
        )
        self.requests = Counter("corral_requests", "Requests by API and outcome", ["api", "code"], registry=r)
        self.prompt_blocks = Counter("corral_prompt_blocks", "Full prompt blocks routed", registry=r)
        self.prefix_hit_blocks = Counter(
            "corral_prefix_hit_blocks",
            "Prompt blocks cached on the chosen replica (router's view)",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "corral_prefix_hit_tokens", "Prompt tokens reported cached by engines", registry=r
        )
        self.prompt_tokens = Counter("corral_prompt_tokens", "Prompt tokens routed", registry=r)
        self.adapter_loads = Counter(
            "corral_adapter_loads_seen", "Adapter loads reported by engines", ["replica", "tier"], registry=r
        )
        self.retries = Counter(
            "corral_retries", "Requests retried on another replica", ["reason"], registry=r
        )
        self.replica_changes = Counter(
            "corral_replica_membership_changes", "Replicas joining/leaving routing", ["change"], registry=r
        )
        self.latency = Histogram(
            "corral_request_latency_seconds", "End-to-end request latency at the router", ["api"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "corral_ttft_seconds",
            "Time to first token at the router",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decision_latency = Histogram(
            "corral_decision_seconds", "Policy decision time (hash excluded)",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3), registry=r,
        )  # fmt: skip
        r.register(_FleetCollector(self))
        self._decision_children: dict[tuple[str, str], Any] = {}
        self.lat_http = self.latency.labels("http")
        self.lat_grpc = self.latency.labels("grpc")
        self.ttft_http = self.ttft.labels("http")
        self.ttft_grpc = self.ttft.labels("grpc")

    def decision(self, policy: str, replica_id: str, gpu_class: str) -> None:
        key = (policy, replica_id)
        c = self._decision_children.get(key)
        if c is None:
            c = self._decision_children[key] = self.decisions.labels(policy, replica_id, gpu_class)
        c.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
