"""Prometheus metrics of one router (``corral_*``), in a registry of its own (several routers may share a
process in tests).

The request path only bumps plain ints and bucket counts (a few hundred ns); everything is turned into
Prometheus families at scrape time by a collector, together with the per-replica gauges read from
:class:`FleetState`.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..events import AdapterTier
from ..state import FleetState

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)


class Hist:
    """A cheap histogram: per-bucket counts and a sum (cumulated at scrape time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.sum += v

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((repr(float(b)), float(acc)))
        out.append(("+Inf", float(acc + self.counts[-1])))
        return out


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
        m = self.m
        dec = CounterMetricFamily(
            "corral_decisions", "Routing decisions", labels=["policy", "replica", "gpu_class"]
        )
        for dkey, n in sorted(m.decisions.items()):
            dec.add_metric(list(dkey), n)
        req = CounterMetricFamily("corral_requests", "Requests by API and outcome", labels=["api", "code"])
        for rkey, n in sorted(m.requests.items()):
            req.add_metric(list(rkey), n)
        yield from (dec, req)
        for name, doc, val in (
            ("corral_prompt_blocks", "Full prompt blocks routed", m.prompt_blocks),
            ("corral_prefix_hit_blocks", "Prompt blocks cached on the chosen replica (router's view)",
             m.prefix_hit_blocks),
            ("corral_prompt_tokens", "Prompt tokens routed", m.prompt_tokens),
            ("corral_prefix_hit_tokens", "Prompt tokens reported cached by engines", m.prefix_hit_tokens),
        ):  # fmt: skip
            c = CounterMetricFamily(name, doc)
            c.add_metric([], val)
            yield c
        for name, doc, hists in (
            ("corral_request_latency_seconds", "End-to-end request latency at the router", m.latency),
            ("corral_ttft_seconds", "Time to first token at the router", m.ttft),
        ):
            h = HistogramMetricFamily(name, doc, labels=["api"])
            for api, hist in sorted(hists.items()):
                h.add_metric([api], hist.buckets(), hist.sum)
            yield h
        h = HistogramMetricFamily("corral_decision_seconds", "Policy decision time (hashing excluded)")
        h.add_metric([], m.decision_latency.buckets(), m.decision_latency.sum)
        yield h


class RouterMetrics:
    def __init__(self, fleet: FleetState, policy_name: str = "") -> None:
        self.fleet = fleet
        self.policy_name = policy_name
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # hot-path accumulators (rendered by _FleetCollector)
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_blocks = 0
        self.prefix_hit_blocks = 0
        self.prompt_tokens = 0
        self.prefix_hit_tokens = 0
        self.latency = {"http": Hist(LATENCY_BUCKETS), "grpc": Hist(LATENCY_BUCKETS)}
        self.ttft = {"http": Hist(LATENCY_BUCKETS), "grpc": Hist(LATENCY_BUCKETS)}
        self.decision_latency = Hist(DECISION_BUCKETS)
        # rare events
        self.adapter_loads = Counter(
            "corral_adapter_loads_seen", "Adapter loads reported by engines", ["replica", "tier"], registry=r
        )
        self.retries = Counter(
            "corral_retries", "Requests retried on another replica", ["reason"], registry=r
        )
        self.replica_changes = Counter(
            "corral_replica_membership_changes", "Replicas joining/leaving routing", ["change"], registry=r
        )
        r.register(_FleetCollector(self))

    def decision(self, policy: str, replica_id: str, gpu_class: str) -> None:
        key = (policy, replica_id, gpu_class)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def forget_replica(self, replica_id: str) -> None:
        """A replica left routing: drop its counters' series (replica ids are pod names, new at every
        rollout: kept, they grew without bound). One that comes back starts them anew (a counter reset)."""
        for key in [k for k in self.decisions if k[1] == replica_id]:
            del self.decisions[key]
        for tier in get_args(AdapterTier):
            with contextlib.suppress(KeyError):
                self.adapter_loads.remove(replica_id, tier)

    def request_done(self, api: str, code: str, latency_s: float) -> None:
        key = (api, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency[api].observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
