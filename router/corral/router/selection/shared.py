"""Feedback across active-active routers: selections and given feedback published in the bandit state folder.

A client's ``POST /v1/feedback`` may reach any router behind a load balancer, not the one that selected
the request. When routers share a state folder (:class:`~corral.router.selection.bandit.BanditStore`),
each also appends what feedback needs to ``<router id>.ledger.jsonl`` (request id, tenant, model, rule, the
bandit's context) and the ids it has taken feedback for to ``<router id>.done.jsonl``. A router that gets
feedback for an id it does not know looks it up in its peers' ledgers, applies the reward to its own
statistics (they are sums, so it does not matter which router adds them), and records it as done; a
second feedback for the id, at any router, finds it done (409). Each router writes only its own files
(no locks); a file is rotated to ``*.old.jsonl`` at ``capacity`` lines, so each router keeps between one and
two capacities of history.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, TextIO

from .bandit import Pending


class _Appender:
    """Appends JSON lines to one file, rotating it to ``*.old.jsonl`` every ``capacity`` lines."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path, self.capacity = path, capacity
        self.old = path.with_name(path.name.removesuffix(".jsonl") + ".old.jsonl")
        self.lines = sum(1 for _ in path.open()) if path.exists() else 0
        self._f: TextIO = path.open("a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self._lock:
            if self.lines >= self.capacity:
                self._f.close()
                self.path.replace(self.old)
                self._f = self.path.open("a", buffering=1, encoding="utf-8")
                self.lines = 0
            self._f.write(line)
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            self._f.close()


class SharedLedger:
    """This router's published selections and feedback, and lookups in its peers' (see the module doc)."""

    def __init__(self, folder: Path, router_id: str, capacity: int = 100_000) -> None:
        self.folder, self.router_id = folder, router_id
        self.ledger = _Appender(folder / f"{router_id}.ledger.jsonl", capacity)
        self.done = _Appender(folder / f"{router_id}.done.jsonl", capacity)

    def _peer_files(self, kind: str) -> list[Path]:
        own = (f"{self.router_id}.{kind}.jsonl", f"{self.router_id}.{kind}.old.jsonl")
        return sorted(p for p in self.folder.glob(f"*.{kind}*.jsonl") if p.name not in own)

    @staticmethod
    def _find(paths: list[Path], needle: str) -> str | None:
        for path in paths:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:
                continue
            i = text.rfind(needle)
            if i >= 0:
                return text[i : text.find("\n", i)]
        return None

    def publish(self, request_id: str, p: Pending) -> None:
        self.ledger.write({"id": request_id, "tenant": p.tenant, "model": p.model, "rule": p.rule, "x": p.x})

    def find(self, request_id: str) -> Pending | None:
        """A peer's pending selection of ``request_id``, or None."""
        line = self._find(self._peer_files("ledger"), '{"id":' + json.dumps(request_id) + ",")
        if line is None:
            return None
        try:
            d = json.loads(line)
            return Pending(d["tenant"], str(d["model"]), d["rule"], d["x"])
        except (ValueError, KeyError, TypeError):
            return None

    def mark_done(self, request_id: str) -> None:
        self.done.write({"id": request_id})

    def done_elsewhere(self, request_id: str) -> bool:
        return self._find(self._peer_files("done"), '{"id":' + json.dumps(request_id) + "}") is not None

    def close(self) -> None:
        self.ledger.close()
        self.done.close()
