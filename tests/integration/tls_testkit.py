"""Throwaway certificates for the TLS tests (made at test time, never committed): see corral.bench.certs."""

from __future__ import annotations

from corral.bench.certs import Certs, make_certs

__all__ = ["Certs", "make_certs"]
