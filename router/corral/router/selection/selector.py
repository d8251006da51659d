"""A compiled ``spec.modelSelection``: rules in priority order over lazily evaluated signals.

:func:`compile_selection` turns the API model into a :class:`Selector` once per policy change (regexes
compiled, example embeddings computed, expressions turned into closures whose ``all``/``any`` children are
ordered cheapest first). :meth:`Selector.select` walks the rules (higher priority first, list order between
equals), evaluates only the signals the walk needs, and returns a :class:`Selection`: the chosen model or
adapter, the rule, every signal value it looked at, the sampling overrides and, for a bandit rule, each
candidate's score — the audit trail of Explain and the OpenTelemetry span.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from corral.api.selection import Bandit, Expr, ModelSelection, SamplingOverrides, expr_signals

from .bandit import ArmScore, BanditStore, FeedbackLedger, Pending
from .embed import Embedder
from .signals import CompiledSignal, RequestInfo, SignalCache, SignalValue, compile_signal

Test = Callable[[SignalCache], bool]
CostFn = Callable[[str, int], float]
"""(candidate model or adapter, prompt tokens) -> expected seconds of GPU time plus adapter loading."""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    priority: int
    test: Test
    target: str | None
    sampling: SamplingOverrides | None
    bandit: Bandit | None
    features: tuple[str, ...]  # the signals of `when`, in order: the bandit's context besides bias and length


@dataclass(slots=True)
class Selection:
    """One request's selection and why (Explain's ``selection``, span attributes ``corral.select.*``)."""

    model: str
    rule: str | None  # None: no rule matched, the default target
    signals: dict[str, SignalValue] = field(default_factory=dict)  # evaluated signals, in evaluation order
    matched: dict[str, bool] = field(default_factory=dict)
    sampling: SamplingOverrides | None = None
    bandit: list[ArmScore] | None = None
    algorithm: str = ""
    forecast: dict[str, float] | None = None  # bandit rules: expected share of the rule's traffic per arm
    shadow: dict[str, str] | None = None  # shadow mode: what the shadow policy chose ({model, rule})
    shadow_selection: Selection | None = None  # ... and its whole selection (for its own feedback)
    info: RequestInfo | None = None  # what the signals read (for the decision log)
    tenant: str | None = None
    context: list[float] | None = None  # bandit rules: the context it chose with (what feedback updates)
    elapsed_us: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "rule": self.rule or "(default)",
            "signals": {k: {"value": v, "matched": self.matched[k]} for k, v in self.signals.items()},
            "elapsed_us": round(self.elapsed_us, 1),
        }
        if self.shadow is not None:
            out["shadow"] = self.shadow
        if self.sampling is not None:
            out["sampling"] = self.sampling.model_dump(exclude_none=True, by_alias=True)
        if self.bandit is not None:
            out["bandit"] = {
                "algorithm": self.algorithm,
                "forecast": self.forecast,
                "scores": [
                    {"arm": s.arm, "predicted": s.predicted, "bonus": s.bonus, "cost": s.cost,
                     "score": s.score, "n": s.n}
                    for s in self.bandit
                ],
            }  # fmt: skip
        return out


def _compile_expr(e: Expr, signals: Mapping[str, CompiledSignal]) -> tuple[Test, int]:
    """(closure, cost rank) of ``e``; ``all``/``any`` children run cheapest first (results are the same:
    signals have no side effects)."""
    if e.signal is not None:
        name = e.signal
        return (lambda c: c(name)), signals[name].cost
    not_ = getattr(e, "not_", None)
    kids = getattr(e, "all_", None) or getattr(e, "any_", None)
    if kids:
        parts = sorted((_compile_expr(k, signals) for k in kids), key=lambda p: p[1])
        tests = tuple(t for t, _ in parts)
        cost = max(c for _, c in parts)
        if getattr(e, "all_", None):
            return (lambda c: all(t(c) for t in tests)), cost
        return (lambda c: any(t(c) for t in tests)), cost
    assert not_ is not None
    inner, cost = _compile_expr(not_, signals)
    return (lambda c: not inner(c)), cost


class Selector:
    """The compiled selection of one policy; bandit state lives in ``store`` and outlives policy changes."""

    def __init__(self, ms: ModelSelection, store: BanditStore, ledger: FeedbackLedger) -> None:
        self.spec = ms
        self.model = ms.model
        self.default = ms.default
        self.store, self.ledger = store, ledger
        corpus = [x for s in ms.signals if s.embedding is not None for x in s.embedding.examples]
        embedder = Embedder(corpus) if corpus else None
        self.signals = {s.name: compile_signal(s, embedder) for s in ms.signals}
        order = sorted(range(len(ms.rules)), key=lambda i: -ms.rules[i].priority)  # stable: list order
        self.rules = []
        for i in order:
            r = ms.rules[i]
            test, _ = _compile_expr(r.when, self.signals)
            feats = tuple(dict.fromkeys(n for _, n in expr_signals(r.when)))
            self.rules.append(CompiledRule(r.name, r.priority, test, r.target, r.sampling, r.bandit, feats))

    def targets(self) -> list[str]:
        """Every model or adapter this selection can choose."""
        return list(dict.fromkeys(t for _, t in self.spec.targets()))

    @property
    def active(self) -> bool:
        return bool(self.rules) or self.default is not None

    def context(self, rule: CompiledRule, cache: SignalCache) -> list[float]:
        """The bandit's context vector: bias, log-scaled prompt length, then the rule's signal values."""
        x = [1.0, math.log1p(cache.info.tokens()) / 10.0]
        for name in rule.features:
            cache(name)
            v = cache.values[name]
            x.append(float(v) if isinstance(v, float) else float(cache.truth[name]))
        return x

    def select(self, info: RequestInfo, cost: CostFn | None = None) -> Selection:
        """Pick the target of one request (no side effects besides evaluating signals)."""
        t0 = time.perf_counter()
        cache = SignalCache(self.signals, info)
        sel: Selection | None = None
        for r in self.rules:
            if not r.test(cache):
                continue
            if r.bandit is None:
                assert r.target is not None
                sel = Selection(r.target, r.name, sampling=r.sampling)
            else:
                b = r.bandit
                x = self.context(r, cache)
                costs = {a: cost(a, info.tokens()) for a in b.candidates} if cost and b.cost_weight else {}
                scores = self.store.scores(r.name, b.candidates, x, algorithm=b.algorithm, alpha=b.alpha,
                                           cost_weight=b.cost_weight, costs=costs)  # fmt: skip
                best = max(scores, key=lambda s: s.score)
                sel = Selection(best.arm, r.name, sampling=r.sampling, bandit=scores, algorithm=b.algorithm,
                                forecast=self.store.demand(r.name, b.candidates, x), context=x)  # fmt: skip
                sel.signals["__context__"] = ",".join(f"{v:.3g}" for v in x)
            break
        if sel is None:
            assert self.default is not None
            sel = Selection(self.default, None)
        ctx = sel.signals.pop("__context__", None)
        sel.signals.update({n: cache.values[n] for n in cache.order})
        sel.matched = {n: cache.truth[n] for n in cache.order}
        if ctx is not None:
            sel.signals["bandit.context"] = ctx
            sel.matched["bandit.context"] = True
        sel.elapsed_us = (time.perf_counter() - t0) * 1e6
        return sel

    def remember(self, request_id: str, tenant: str | None, sel: Selection, info: RequestInfo) -> None:
        """Keep what feedback on ``request_id`` needs (the bandit context when a bandit chose)."""
        x = sel.context  # as chosen: the policy (and this rule) may have changed since
        if x is None and sel.bandit is not None and sel.rule is not None:
            rule = next((r for r in self.rules if r.name == sel.rule), None)
            x = self.context(rule, SignalCache(self.signals, info)) if rule is not None else None
        p = Pending(tenant, sel.model, sel.rule, x)
        self.ledger.record(request_id, p)
        if self.store.shared is not None:
            self.store.shared.publish(request_id, p)

    def feedback(
        self, request_id: str, tenant: str | None, score: object, shared: Any = None
    ) -> dict[str, Any]:
        """Reward the bandit that chose ``request_id``; :class:`FeedbackError` 404 (unknown, or another
        tenant's id), 400 (bad score) or 409 (given twice). ``shared``: in place of the store's shared
        ledger (its peers' files already read, off the event loop)."""
        p = self.ledger.take(request_id, tenant, score, shared if shared is not None else self.store.shared)
        learned = p.x is not None and p.rule is not None
        if learned:
            assert p.x is not None and p.rule is not None
            self.store.update(p.rule, p.model, p.x, float(score))  # type: ignore[arg-type]
        return {"request_id": request_id, "model": p.model, "rule": p.rule or "(default)", "learned": learned}


def compile_selection(
    ms: ModelSelection | None, store: BanditStore | None = None, ledger: FeedbackLedger | None = None
) -> Selector | None:
    """The selector of ``ms`` (None when it has no rules and no default: selection is off)."""
    if ms is None or (not ms.rules and ms.default is None):
        return None
    return Selector(ms, store or BanditStore(), ledger or FeedbackLedger())
