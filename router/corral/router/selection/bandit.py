"""Contextual bandits over a rule's candidates, their persistent shared state, and the feedback ledger.

Both algorithms are linear in a small context vector ``x`` (bias, scaled prompt length, the rule's signal
values) with per-arm ridge statistics ``A = I + sum x x^T`` and ``b = sum r x``:

* LinUCB: ``score = theta^T x + alpha * sqrt(x^T A^-1 x) - cost_weight * cost``, ``theta = A^-1 b``;
* Thompson sampling: ``theta ~ N(A^-1 b, alpha^2 A^-1)``, ``score = theta^T x - cost_weight * cost``.

``cost`` is the request's expected GPU-seconds on the candidate (its GPU class's profile: prefill plus
decode) plus, as in POLAR, the expected adapter-load seconds (share of the candidate's replicas where the
adapter is not GPU-resident x its load time) — see :mod:`corral.router.selection.costs`.

**State that survives restarts and is shared by active-active routers.** The statistics are sums, so they
merge by addition. :class:`BanditStore` keeps this router's own increments (``A - I``, ``b``, ``n`` per
rule and arm) and writes them atomically to ``STATE_DIR/<router id>.json`` (at most every ``flush_s``
and on close); it reads every other ``*.json`` in the folder (the peers', re-read when their mtime
changes, at most every ``sync_s``) and adds their increments. Each router writes only its own file, so a
shared folder (a ReadWriteMany volume, or a folder synced from object storage) needs no locking; a
restarted router with the same id reloads its own file, and one with a new id counts its old file as a
peer, so nothing learnt is lost or counted twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SEP = "\x1f"
STATE_VERSION = 1


@dataclass(slots=True)
class ArmStats:
    """Additive sufficient statistics of one arm: ``A - I`` (d x d), ``b`` (d) and the reward count."""

    a: np.ndarray
    b: np.ndarray
    n: int = 0

    @classmethod
    def zero(cls, d: int) -> ArmStats:
        return cls(np.zeros((d, d)), np.zeros(d))

    def to_json(self) -> dict[str, object]:
        return {"A": self.a.tolist(), "b": self.b.tolist(), "n": self.n}

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> ArmStats:
        a = np.asarray(obj["A"], dtype=float)
        b = np.asarray(obj["b"], dtype=float)
        finite = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
        if a.ndim != 2 or a.shape != (len(b), len(b)) or not finite:
            raise ValueError("malformed arm statistics")
        return cls(a, b, int(obj.get("n", 0)))  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class ArmScore:
    """One candidate's score in a bandit decision (what Explain and spans show)."""

    arm: str
    predicted: float  # theta^T x (mean for LinUCB, the sample for Thompson)
    bonus: float  # LinUCB's exploration bonus (0 for Thompson)
    cost: float  # GPU-seconds + adapter-load seconds
    score: float  # predicted + bonus - cost_weight * cost
    n: int  # rewards seen for this arm (all routers)


def key(rule: str, arm: str) -> str:
    return f"{rule}{SEP}{arm}"


class BanditStore:
    """All bandits of one router: own increments (persisted) + peers' (read from the shared folder)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        router_id: str = "router",
        *,
        flush_s: float = 1.0,
        sync_s: float = 2.0,
        seed: int | None = None,
    ) -> None:
        self.dir = Path(state_dir) if state_dir is not None else None
        self.router_id = router_id
        self.flush_s, self.sync_s = flush_s, sync_s
        self.own: dict[str, ArmStats] = {}
        self.peers: dict[str, tuple[float, dict[str, ArmStats]]] = {}  # file name -> (mtime, stats)
        self.rng = np.random.default_rng(seed)
        self._solved: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, int]] = {}  # (A^-1, theta, n)
        self._dirty = False
        self._last_flush = self._last_sync = 0.0
        self.shared: Any = None  # a SharedLedger when there is a folder (feedback at any router)
        if self.dir is not None:
            from .shared import SharedLedger  # imports this module

            self.dir.mkdir(parents=True, exist_ok=True)
            self.shared = SharedLedger(self.dir, router_id)
            own = self._read(self.own_file)
            if own is not None:
                self.own = own
            self.sync(force=True)

    @property
    def own_file(self) -> Path:
        assert self.dir is not None
        return self.dir / f"{self.router_id}.json"

    # ---- persistence ----------------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> dict[str, ArmStats] | None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('version')!r}, expected {STATE_VERSION}")
            return {k: ArmStats.from_json(v) for k, v in doc["arms"].items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring bandit state file %s: %s", path, e)
            return None

    def flush(self, force: bool = False) -> None:
        """Write this router's increments (atomically: temp file + rename) when changed."""
        if self.dir is None or not (self._dirty or force):
            return
        doc = {"version": STATE_VERSION, "router": self.router_id,
               "arms": {k: v.to_json() for k, v in self.own.items()}}  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.own_file)
        self._dirty = False
        self._last_flush = time.monotonic()

    def sync(self, force: bool = False) -> None:
        """Re-read peers' files whose mtime changed (at most every ``sync_s`` unless forced)."""
        now = time.monotonic()
        if self.dir is None or (not force and now - self._last_sync < self.sync_s):
            return
        self._last_sync = now
        seen: set[str] = set()
        for entry in os.scandir(self.dir):
            name = entry.name
            if not name.endswith(".json") or name.startswith(".") or name == self.own_file.name:
                continue
            seen.add(name)
            mtime = entry.stat().st_mtime
            old = self.peers.get(name)
            if old is not None and old[0] == mtime:
                continue
            stats = self._read(Path(entry.path))
            if stats is not None:
                self.peers[name] = (mtime, stats)
                self._solved.clear()
        for gone in set(self.peers) - seen:
            del self.peers[gone]
            self._solved.clear()

    def close(self) -> None:
        self.flush()
        if self.shared is not None:
            self.shared.close()

    # ---- statistics -----------------------------------------------------------------------------------
    def totals(self, k: str, d: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``A`` (with the identity prior), ``b`` and ``n`` of arm ``k``, all routers together."""
        a = np.eye(d)
        b = np.zeros(d)
        n = 0
        for stats in (self.own.get(k), *(p[1].get(k) for p in self.peers.values())):
            if stats is not None and stats.b.shape == (d,):
                a += stats.a
                b += stats.b
                n += stats.n
        return a, b, n

    def update(self, rule: str, arm: str, x: Sequence[float], reward: float) -> None:
        v = np.asarray(x, dtype=float)
        k = key(rule, arm)
        s = self.own.get(k)
        if s is None or s.b.shape != v.shape:
            s = self.own[k] = ArmStats.zero(len(v))
        s.a += np.outer(v, v)
        s.b += reward * v
        s.n += 1
        self._solved.pop((k, len(v)), None)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def solved(self, k: str, d: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(A^-1, theta = A^-1 b, n) of arm ``k``, cached until its statistics change."""
        got = self._solved.get((k, d))
        if got is None:
            a, b, n = self.totals(k, d)
            a_inv = np.linalg.inv(a)
            got = self._solved[(k, d)] = (a_inv, a_inv @ b, n)
        return got

    def scores(
        self,
        rule: str,
        arms: Sequence[str],
        x: Sequence[float],
        *,
        algorithm: str,
        alpha: float,
        cost_weight: float,
        costs: Mapping[str, float],
    ) -> list[ArmScore]:
        """Each arm's score for context ``x`` (peers re-read first when due)."""
        self.sync()
        v = np.asarray(x, dtype=float)
        out: list[ArmScore] = []
        for arm in arms:
            a_inv, theta, n = self.solved(key(rule, arm), len(v))
            if algorithm == "thompson":
                cov = (alpha**2) * a_inv
                theta = self.rng.multivariate_normal(theta, (cov + cov.T) / 2)
                pred, bonus = float(theta @ v), 0.0
            else:
                pred = float(theta @ v)
                bonus = alpha * math.sqrt(max(0.0, float(v @ a_inv @ v)))
            cost = float(costs.get(arm, 0.0))
            out.append(ArmScore(arm, pred, bonus, cost, pred + bonus - cost_weight * cost, n))
        return out

    def demand(self, rule: str, arms: Sequence[str], x: Sequence[float]) -> dict[str, float]:
        """Forecast share of a rule's traffic per arm: a softmax of the arms' mean predicted rewards."""
        v = np.asarray(x, dtype=float)
        preds = [float(self.solved(key(rule, arm), len(v))[1] @ v) for arm in arms]
        e = np.exp((np.asarray(preds) - max(preds)) * 10.0)
        return dict(zip(arms, (e / e.sum()).tolist(), strict=True))


# -------------------------------------------------------------------------------------------- feedback


class FeedbackError(Exception):
    """A feedback call the router refuses; ``status`` is its HTTP status (404 unknown, 400 bad, 409 twice)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True)
class Pending:
    """A selected request awaiting feedback: who sent it, what chose its model, and the bandit's context."""

    tenant: str | None
    model: str
    rule: str | None  # None: the default target
    x: list[float] | None = None  # set when a bandit chose (its context vector)
    done: bool = False
    t: float = field(default_factory=time.monotonic)


class FeedbackLedger:
    """The last ``capacity`` selected requests by the router's request id, for ``POST /v1/feedback``."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, Pending] = OrderedDict()

    def record(self, request_id: str, pending: Pending) -> None:
        self.items[request_id] = pending
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def take(self, request_id: str, tenant: str | None, score: object, shared: Any = None) -> Pending:
        """The pending entry of ``request_id`` for ``tenant`` (marked done), or :class:`FeedbackError`;
        ``shared`` (a :class:`~corral.router.selection.shared.SharedLedger`) finds peers' selections and
        feedback."""
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            raise FeedbackError(400, f"field 'score' must be a number in [0, 1] (got {score!r})")
        if not 0.0 <= float(score) <= 1.0:
            raise FeedbackError(400, f"field 'score' must be in [0, 1] (got {score})")
        if not request_id:
            raise FeedbackError(400, "missing required field 'request_id' (the response's id)")
        p = self.items.get(request_id)
        if p is None and shared is not None:
            p = shared.find(request_id)  # selected by a router sharing the state folder
            if p is not None:
                self.record(request_id, p)
        if p is None or p.tenant != tenant:  # another tenant's id reads as unknown: ids are not disclosed
            where = "this router (and the routers sharing its state folder)" if shared else "this router"
            raise FeedbackError(
                404,
                f"unknown request id '{request_id}': not one of the last {self.capacity} requests {where} "
                "chose a model for (send the response's id of a request to the selection model)",
            )
        if p.done or (shared is not None and shared.done_elsewhere(request_id)):
            p.done = True
            raise FeedbackError(409, f"feedback for request '{request_id}' was already given")
        p.done = True
        if shared is not None:
            shared.mark_done(request_id)
        return p
