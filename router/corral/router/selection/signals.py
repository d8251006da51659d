"""Compiled signals and their lazy, per-request evaluation.

Each :class:`~corral.api.selection.Signal` compiles to a :class:`CompiledSignal` with a cost rank (header and
tenant tests are dictionary lookups; the token count needs the prompt tokenized; keywords and regexes
scan the text; language detection and embeddings cost the most). :class:`SignalCache` evaluates a signal
the first time a rule asks for it and remembers the result, so each signal runs at most once per request,
and the Boolean operators of :mod:`.selector` ask for their cheapest children first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from corral.api.selection import Signal

from . import language
from .embed import Embedder

SignalValue = bool | float | int | str
"""What a signal saw: a similarity, a token count, a language code, a header value, or a match."""


@dataclass(slots=True)
class RequestInfo:
    """What signals may look at: the prompt text (a chat's messages joined), the tenant, the request's
    headers (lower-case names) and a lazy token count (the prompt tokenized only if a signal needs it)."""

    text: str
    tenant: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    count_tokens: Callable[[], int] | None = None
    n_tokens: int | None = None  # the count, once known
    vec: np.ndarray | None = None  # the prompt's embedding, once computed

    def tokens(self) -> int:
        if self.n_tokens is None:
            self.n_tokens = self.count_tokens() if self.count_tokens is not None else len(self.text.split())
        return self.n_tokens


@dataclass(frozen=True, slots=True)
class CompiledSignal:
    name: str
    kind: str
    cost: int  # rank: lower runs first
    test: Callable[[RequestInfo], tuple[bool, SignalValue]]


COST = {"tenant": 0, "header": 0, "promptTokens": 1, "keywords": 2, "regex": 3, "language": 4, "embedding": 5}


def compile_signal(s: Signal, embedder: Embedder | None) -> CompiledSignal:
    kind = s.kind
    test: Callable[[RequestInfo], tuple[bool, SignalValue]]
    if s.tenant is not None:
        tenants = frozenset(s.tenant)

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            return r.tenant in tenants, r.tenant or ""

    elif s.header is not None:
        hname, values = s.header.name, frozenset(s.header.values)

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            v = r.headers.get(hname, "")
            return v in values, v

    elif s.prompt_tokens is not None:
        lo = s.prompt_tokens.min if s.prompt_tokens.min is not None else 0
        hi = s.prompt_tokens.max if s.prompt_tokens.max is not None else 1 << 62

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            n = r.tokens()
            return lo <= n <= hi, n

    elif s.keywords is not None:
        words = sorted({k.lower() for k in s.keywords}, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(w) for w in words), re.IGNORECASE)

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            m = pattern.search(r.text)
            return m is not None, m.group(0).lower() if m else ""

    elif s.regex is not None:
        rx = re.compile(s.regex)

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            m = rx.search(r.text)
            return m is not None, m is not None

    elif s.language is not None:
        langs = frozenset(s.language)

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            code = language.detect(r.text)
            return code in langs, code

    else:
        assert s.embedding is not None and embedder is not None
        examples = embedder.matrix(s.embedding.examples)
        threshold = s.embedding.threshold

        def test(r: RequestInfo) -> tuple[bool, SignalValue]:
            v = _embedding(r, embedder)
            sim = float(np.max(examples @ v)) if len(examples) else 0.0
            return sim >= threshold, round(sim, 4)

    return CompiledSignal(s.name, kind, COST[kind], test)


def _embedding(r: RequestInfo, embedder: Embedder) -> np.ndarray:
    """The prompt's vector, computed once per request for all embedding signals."""
    if r.vec is None:
        r.vec = embedder.embed(r.text)
    return r.vec


class SignalCache:
    """One request's signal results, each computed at most once, in the order rules ask for them."""

    __slots__ = ("info", "order", "signals", "truth", "values")

    def __init__(self, signals: Mapping[str, CompiledSignal], info: RequestInfo) -> None:
        self.info = info
        self.signals = signals
        self.truth: dict[str, bool] = {}
        self.values: dict[str, SignalValue] = {}
        self.order: list[str] = []  # evaluation order (what Explain shows)

    def __call__(self, name: str) -> bool:
        t = self.truth.get(name)
        if t is None:
            t, v = self.signals[name].test(self.info)
            self.truth[name], self.values[name] = t, v
            self.order.append(name)
        return t
