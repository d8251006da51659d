"""Prometheus families of the router's tenant API keys (:class:`corral.router.server.auth.KeyStore`),
rendered at scrape time: keys and tenants in force, reloads, and whether the key file's current version was
refused (malformed: the previous keys stay in force; the log names the line). No key, digest or tenant
name is a label value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .auth import KeyStore


class KeyStoreCollector(Collector):
    def __init__(self, store: Callable[[], KeyStore | None]) -> None:
        self.store = store  # the router's current store (None: auth off), read at each scrape

    def collect(self) -> Iterator[Any]:
        s = self.store()
        enabled = GaugeMetricFamily("corral_api_keys_enabled", "1 if requests need a tenant API key")
        enabled.add_metric([], 0.0 if s is None else 1.0)
        yield enabled
        if s is None:
            return
        keys = GaugeMetricFamily("corral_api_keys", "API keys in force")
        keys.add_metric([], float(len(s.table.principals)))
        tenants = GaugeMetricFamily("corral_api_key_tenants", "Tenants with at least one API key in force")
        tenants.add_metric([], float(len(s.table.tenants)))
        reloads = CounterMetricFamily("corral_api_key_reloads", "Key file versions taken into force")
        reloads.add_metric([], float(s.reloads))
        bad = GaugeMetricFamily(
            "corral_api_key_file_refused",
            "1 while the key file's current version is refused (malformed; the previous keys stay)",
        )
        bad.add_metric([], 0.0 if s.last_error is None else 1.0)
        yield from (keys, tenants, reloads, bad)
