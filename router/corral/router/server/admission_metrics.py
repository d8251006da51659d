"""Prometheus families of the router's admission control (:class:`corral.router.admission.Admission`),
rendered at scrape time: requests admitted, queued and rejected (by reason) per tenant, and the requests
waiting and in flight per tenant now. The ``tenant`` label is the tenant's *name* (``anonymous`` without
auth), never an API key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..admission import REJECT_REASONS, Admission


class AdmissionCollector(Collector):
    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Any]:
        admitted = CounterMetricFamily(
            "corral_admission_admitted", "Requests admitted by admission control", labels=["tenant"]
        )
        queued = CounterMetricFamily(
            "corral_admission_queued",
            "Requests that waited in the router's queue for fleet capacity",
            labels=["tenant"],
        )
        rejected = CounterMetricFamily(
            "corral_admission_rejected",
            "Requests refused by admission control (429, or 400 for too_large)",
            labels=["tenant", "reason"],
        )
        waiting = GaugeMetricFamily(
            "corral_admission_waiting", "Requests waiting in the router's queue now", labels=["tenant"]
        )
        inflight = GaugeMetricFamily(
            "corral_admission_inflight", "Admitted requests not finished yet", labels=["tenant"]
        )
        for label, n_wait, n_flight, counts in sorted(self.admission.stats()):
            admitted.add_metric([label], counts.get("admitted", 0))
            queued.add_metric([label], counts.get("queued", 0))
            for reason in REJECT_REASONS:
                rejected.add_metric([label, reason], counts.get(f"rejected_{reason}", 0))
            waiting.add_metric([label], n_wait)
            inflight.add_metric([label], n_flight)
        yield from (admitted, queued, rejected, waiting, inflight)
