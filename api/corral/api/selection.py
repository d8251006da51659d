"""``spec.modelSelection`` of a RoutingPolicy: signals, Boolean rules and bandits that pick the model.

This module owns the selection schema and its per-object rules (each a :class:`~corral.api.common.CelRule`
checked in Python with the apiserver's words), plus :func:`selection_lint`, the static analysis
``corral validate`` and the admission webhook add on top (overlapping rules of equal priority, unreachable
rules). A request whose ``model`` is :attr:`ModelSelection.model` (default ``auto``) is routed by these
rules; a request naming a concrete model or adapter is not.

* A **signal** is a named test of the request, exactly one of: ``keywords`` (any word, case-insensitive),
  ``regex`` (searched in the prompt), ``promptTokens`` (a length range), ``tenant`` (the API key's
  tenant), ``header`` (a request header such as a task tag, any of the values), ``language`` (detected
  from the prompt) or ``embedding`` (similarity to labelled examples at or above a threshold).
* A **rule** is ``when`` (a Boolean expression: exactly one of ``signal``, ``all``, ``any``, ``not``,
  nested up to four levels, the last a signal) -> ``target`` (a model or adapter, with optional
  ``sampling`` overrides) or a ``bandit`` choosing among candidates from feedback. Higher ``priority``
  first; the first rule in list order wins between equal priorities; ``default`` when none matches.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import (
    NAME_MAX,
    NAME_PATTERN,
    TENANT_MAX,
    TENANT_PATTERN,
    CelRule,
    CorralModel,
    Issue,
    K8sFloat,
    K8sInt,
    cel,
    duplicates,
    list_map,
    list_set,
    name_field,
    raise_issues,
    set_duplicates,
)

MAX_SIGNALS = 32
MAX_SELECTION_RULES = 64
MAX_CHILDREN = 8
MAX_VALUES = 64
MAX_EXAMPLES = 64
MAX_CANDIDATES = 8
DEFAULT_SELECTION_MODEL = "auto"

Language = Literal["en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja", "ko", "ar", "hi", "el", "he"]
"""Languages the router's detector tells apart (ISO 639-1): Latin-script ones by stop words, the others by
script."""

SIGNAL_KINDS: tuple[str, ...] = (
    "keywords",
    "regex",
    "promptTokens",
    "tenant",
    "header",
    "language",
    "embedding",
)
"""The signal kinds (camelCase, as in YAML); a signal sets exactly one."""


def _one_of(fields: Sequence[str], what: str, path: str | None = None) -> CelRule:
    terms = " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields)
    return CelRule(rule=f"{terms} == 1", message=f"set exactly one of {', '.join(fields)} ({what})",
                   field_path=path)  # fmt: skip


def _count_set(obj: CorralModel, fields: Sequence[str]) -> int:
    by_alias = {(f.alias or name): name for name, f in type(obj).model_fields.items()}
    return sum(getattr(obj, by_alias[f]) is not None for f in fields)


# ------------------------------------------------------------------------------------------------ signals

RULE_TOKENS_RANGE = CelRule(
    rule="!has(self.min) || !has(self.max) || self.min <= self.max",
    message="min must be <= max",
    field_path=".min",
)
RULE_TOKENS_ANY = CelRule(rule="has(self.min) || has(self.max)", message="set min, max or both")


TenantName = Annotated[str, Field(min_length=1, max_length=TENANT_MAX, pattern=TENANT_PATTERN)]


class PromptTokens(CorralModel):
    """Prompt length in tokens (the model's tokenizer): ``min <= tokens <= max``; a bound may be unset."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_TOKENS_ANY, RULE_TOKENS_RANGE))

    min: K8sInt | None = Field(default=None, ge=0, le=10_000_000, description="Fewest tokens (inclusive).")
    max: K8sInt | None = Field(default=None, ge=0, le=10_000_000, description="Most tokens (inclusive).")

    @model_validator(mode="after")
    def _range(self) -> PromptTokens:
        if self.min is None and self.max is None:
            raise_issues([("", RULE_TOKENS_ANY.message)])
        if self.min is not None and self.max is not None and self.min > self.max:
            raise_issues([(".min", f"{RULE_TOKENS_RANGE.message} (got {self.min} > {self.max})")])
        return self


HEADER_PATTERN = r"^[a-z0-9][a-z0-9-]*$"


class HeaderMatch(CorralModel):
    """A request header (HTTP header, or gRPC metadata key) with any of some values, e.g. a task tag."""

    name: str = Field(
        min_length=1,
        max_length=128,
        pattern=HEADER_PATTERN,
        description="Header name, lower case (e.g. x-corral-task).",
    )
    values: list[Annotated[str, Field(max_length=256)]] = Field(
        min_length=1,
        max_length=MAX_VALUES,
        description="The signal is true when the header equals any of these (exact, unique).",
        json_schema_extra=list_set(),
    )

    @model_validator(mode="after")
    def _unique(self) -> HeaderMatch:
        raise_issues(set_duplicates(self.values, ".values"))
        return self


class Embedding(CorralModel):
    """Similarity of the prompt to labelled examples (the signal's name is their label)."""

    examples: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1,
        max_length=MAX_EXAMPLES,
        description="Example prompts of this label; the signal's value is the best cosine similarity.",
    )
    threshold: K8sFloat = Field(
        default=0.2,
        gt=0,
        le=1,
        description="The signal is true at or above this cosine similarity (0 < t <= 1) of the router's "
        "hashed character n-gram TF-IDF vectors (related prompts score about 0.2 to 0.5).",
    )


SIGNAL_FIELDS = SIGNAL_KINDS
RULE_SIGNAL_ONE_KIND = _one_of(SIGNAL_FIELDS, "one signal kind")
RULE_REGEX_COMPILES = CelRule(
    rule="!has(self.regex) || (''.matches(self.regex) ? true : true)",  # an invalid RE2 pattern: an error
    message="must be a valid RE2 regular expression",
    field_path=".regex",
)
RE2_UNSUPPORTED = re.compile(r"\(\?(?:=|!|<=|<!)|\\[1-9]|\(\?P=|\(\?\(|[*+?}]\+")
"""Python-only constructs RE2 (the apiserver's CEL) rejects: lookarounds, backreferences, conditionals,
possessive quantifiers."""


class Signal(CorralModel):
    """One named test of a request; exactly one kind is set."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_SIGNAL_ONE_KIND, RULE_REGEX_COMPILES))

    name: str = name_field("Signal name, referenced by rules.")
    keywords: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_VALUES,
        description="True when the prompt contains any of these words or phrases (case-insensitive).",
    )
    regex: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="True when this regular expression is found in the prompt.",
    )
    prompt_tokens: PromptTokens | None = Field(default=None, description="Prompt length range in tokens.")
    tenant: list[TenantName] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_VALUES,
        description="True for requests of any of these tenants (names in the tenants' Secret).",
    )
    header: HeaderMatch | None = Field(default=None, description="A request header with any of some values.")
    language: list[Language] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="True when the prompt's detected language is any of these (ISO 639-1).",
    )
    embedding: Embedding | None = Field(default=None, description="Similarity to labelled examples.")

    @model_validator(mode="after")
    def _kind(self) -> Signal:
        if _count_set(self, SIGNAL_FIELDS) != 1:
            raise_issues([("", RULE_SIGNAL_ONE_KIND.message)])
        if self.regex is not None:
            try:
                re.compile(self.regex)
                bad = RE2_UNSUPPORTED.search(self.regex)
                if bad:
                    raise re.error(f"{bad.group(0)!r} (lookarounds, backreferences) is not RE2")
            except re.error as e:
                raise_issues([(".regex", f"{RULE_REGEX_COMPILES.message}: {e}")])
        return self

    @property
    def kind(self) -> str:
        return next(f for f in SIGNAL_FIELDS if _count_set(self, (f,)))


# ----------------------------------------------------------------------------------- Boolean expressions

EXPR_FIELDS = ("signal", "all", "any", "not")
RULE_EXPR_ONE = _one_of(EXPR_FIELDS, "one operator")


def _signal_ref() -> object:
    return Field(
        default=None, min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN, description="A signal's name."
    )


class Atom(CorralModel):
    """One signal (what ``not`` negates at the deepest level)."""

    signal: str = Field(
        min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN, description="A signal's name."
    )


RULE_LEAF_ONE = _one_of(("signal", "not"), "a signal or its negation")


class Leaf(CorralModel):
    """The deepest level of a ``when`` expression: a signal, or ``not`` of one."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_LEAF_ONE))

    signal: str | None = _signal_ref()  # type: ignore[assignment]
    not_: Atom | None = Field(default=None, alias="not", description="True when this signal is false.")

    @model_validator(mode="after")
    def _one(self) -> Leaf:
        if (self.signal is None) == (self.not_ is None):
            raise_issues([("", RULE_LEAF_ONE.message)])
        return self


class Clause(CorralModel):
    """Second level of a ``when`` expression: a signal, or all / any / not of signals."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_EXPR_ONE))

    signal: str | None = _signal_ref()  # type: ignore[assignment]
    all_: list[Leaf] | None = Field(
        default=None, alias="all", min_length=1, max_length=MAX_CHILDREN, description="True when all are."
    )
    any_: list[Leaf] | None = Field(
        default=None, alias="any", min_length=1, max_length=MAX_CHILDREN, description="True when any is."
    )
    not_: Leaf | None = Field(default=None, alias="not", description="True when this is false.")

    @model_validator(mode="after")
    def _one(self) -> Clause:
        if _count_set(self, EXPR_FIELDS) != 1:
            raise_issues([("", RULE_EXPR_ONE.message)])
        return self


class When(CorralModel):
    """A rule's condition: a signal, or all / any / not of clauses (four levels at most)."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_EXPR_ONE))

    signal: str | None = _signal_ref()  # type: ignore[assignment]
    all_: list[Clause] | None = Field(
        default=None, alias="all", min_length=1, max_length=MAX_CHILDREN, description="True when all are."
    )
    any_: list[Clause] | None = Field(
        default=None, alias="any", min_length=1, max_length=MAX_CHILDREN, description="True when any is."
    )
    not_: Clause | None = Field(default=None, alias="not", description="True when this is false.")

    @model_validator(mode="after")
    def _one(self) -> When:
        if _count_set(self, EXPR_FIELDS) != 1:
            raise_issues([("", RULE_EXPR_ONE.message)])
        return self


Expr = When | Clause | Leaf | Atom


def expr_signals(e: Expr, path: str = ".when") -> Iterator[tuple[str, str]]:
    """(path, signal name) of every signal reference in ``e``."""
    if e.signal is not None:
        yield f"{path}.signal", e.signal
    if isinstance(e, Atom):
        return
    if isinstance(e, Leaf):
        if e.not_ is not None:
            yield f"{path}.not.signal", e.not_.signal
        return
    alls: Sequence[Expr] = e.all_ or ()
    anys: Sequence[Expr] = e.any_ or ()
    for i, k in enumerate(alls):
        yield from expr_signals(k, f"{path}.all[{i}]")
    for i, k in enumerate(anys):
        yield from expr_signals(k, f"{path}.any[{i}]")
    if e.not_ is not None:
        yield from expr_signals(e.not_, f"{path}.not")


def expr_eval(e: Expr, value: Callable[[str], bool]) -> bool:
    """Evaluate ``e`` with ``value(signal name)``; short-circuits, so ``value`` is asked only as needed."""
    if e.signal is not None:
        return value(e.signal)
    if isinstance(e, Atom):  # pragma: no cover - an Atom always has a signal
        return False
    if isinstance(e, Leaf):
        return not value(e.not_.signal) if e.not_ is not None else False
    if e.all_ is not None:
        return all(expr_eval(k, value) for k in e.all_)
    if e.any_ is not None:
        return any(expr_eval(k, value) for k in e.any_)
    assert e.not_ is not None
    return not expr_eval(e.not_, value)


# ----------------------------------------------------------------------------------------------- rules


class SamplingOverrides(CorralModel):
    """Sampling parameters a rule sets on the requests it routes (replacing the client's)."""

    temperature: K8sFloat | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    top_p: K8sFloat | None = Field(default=None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: K8sInt | None = Field(default=None, ge=-1, le=100_000, description="Top-k (-1: off).")
    max_tokens: K8sInt | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Cap on generated tokens (the smaller of this and the client's).",
    )


BanditAlgorithm = Literal["linucb", "thompson"]


class Bandit(CorralModel):
    """A contextual bandit choosing among a rule's candidates, rewarded by ``POST /v1/feedback`` scores."""

    candidates: list[Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]] = Field(
        min_length=2,
        max_length=MAX_CANDIDATES,
        description="Models or adapters to choose among (unique).",
        json_schema_extra=list_set(),
    )
    algorithm: BanditAlgorithm = Field(
        default="linucb", description="'linucb' (upper confidence bound) or 'thompson' (posterior sampling)."
    )
    alpha: K8sFloat = Field(
        default=1.0, ge=0, le=100, description="Exploration: width of the confidence bound / posterior scale."
    )
    cost_weight: K8sFloat = Field(
        default=0.0,
        ge=0,
        le=1000,
        description=(
            "Weight of the cost term (expected GPU-seconds of the request on the candidate's GPU class, plus "
            "its expected adapter-load seconds) subtracted from the predicted reward."
        ),
    )

    @model_validator(mode="after")
    def _unique(self) -> Bandit:
        raise_issues(set_duplicates(self.candidates, ".candidates"))
        return self


RULE_TARGET_OR_BANDIT = _one_of(("target", "bandit"), "where the rule sends requests")


class SelectionRule(CorralModel):
    """``when`` -> ``target`` (or a bandit over candidates)."""

    model_config = ConfigDict(json_schema_extra=cel(RULE_TARGET_OR_BANDIT))

    name: str = name_field("Rule name (unique).")
    priority: K8sInt = Field(
        default=0, ge=-1000, le=1000, description="Higher first; equal priorities go in list order."
    )
    when: When = Field(description="Condition over the signals.")
    target: str | None = Field(
        default=None,
        min_length=1,
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description="Model or adapter of the pool that matching requests go to.",
    )
    sampling: SamplingOverrides | None = Field(default=None, description="Sampling overrides.")
    bandit: Bandit | None = Field(default=None, description="Learn the target among candidates instead.")

    @model_validator(mode="after")
    def _one(self) -> SelectionRule:
        if (self.target is None) == (self.bandit is None):
            raise_issues([("", RULE_TARGET_OR_BANDIT.message)])
        return self

    def targets(self) -> list[str]:
        return list(self.bandit.candidates) if self.bandit is not None else [self.target or ""]


KNOWN_SIGNALS_MESSAGE = "rules may only name signals declared in spec.modelSelection.signals"


def _known_signal_rules() -> tuple[CelRule, ...]:
    """Every signal a rule names is declared: :class:`When`'s paths spelled out (CEL has no recursion),
    split by how many lists a path crosses so that each rule's estimated cost stays well inside the
    apiserver's per-expression budget (rules x children x children x signals comparisons at most)."""

    def known(x: str) -> str:
        return f"self.signals.exists(s, s.name == {x})"

    def opt(x: str, field: str) -> str:
        return f"(!has({x}.{field}) || {known(f'{x}.{field}')})"

    def leaf(x: str) -> str:  # a Leaf: signal, or not: {signal}
        return f"{opt(x, 'signal')} && (!has({x}.not) || {known(x + '.not.signal')})"

    def rule(body: str) -> CelRule:
        return CelRule(rule=f"!has(self.rules) || self.rules.all(r, {body})", message=KNOWN_SIGNALS_MESSAGE,
                       field_path=".rules")  # fmt: skip

    w = "r.when"
    # no list crossed: when.signal, when.not (a Clause: its signal and its not, a Leaf)
    flat = f"{opt(w, 'signal')} && (!has({w}.not) || ({opt(w + '.not', 'signal')} && "
    flat += f"(!has({w}.not.not) || ({leaf(w + '.not.not')}))))"
    # one list: when.all/any[c] (a Clause's signal and not), when.not.all/any[l] (Leaves)
    one = " && ".join(
        f"(!has({w}.{op}) || {w}.{op}.all(c, {opt('c', 'signal')} && (!has(c.not) || ({leaf('c.not')}))))"
        for op in ("all", "any")
    )
    one += " && " + " && ".join(
        f"(!has({w}.not) || !has({w}.not.{op}) || {w}.not.{op}.all(l, {leaf('l')}))" for op in ("all", "any")
    )
    rules = [rule(flat), rule(one)]
    # two lists: when.all/any[c].all/any[l] (Leaves), one rule per pair
    for outer in ("all", "any"):
        for inner in ("all", "any"):
            rules.append(rule(f"!has({w}.{outer}) || {w}.{outer}.all(c, !has(c.{inner}) || "
                              f"c.{inner}.all(l, {leaf('l')}))"))  # fmt: skip
    return tuple(rules)


RULES_KNOWN_SIGNALS = _known_signal_rules()
RULE_DEFAULT_WITH_RULES = CelRule(
    rule="!has(self.rules) || size(self.rules) == 0 || has(self.default)",
    message="set default (the target when no rule matches) when there are rules",
    field_path=".default",
)


class ModelSelection(CorralModel):
    """Rules that choose a model or adapter for requests naming :attr:`model` (default ``auto``)."""

    model_config = ConfigDict(json_schema_extra=cel(*RULES_KNOWN_SIGNALS, RULE_DEFAULT_WITH_RULES))

    model: str = Field(
        default=DEFAULT_SELECTION_MODEL,
        min_length=1,
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description="The model name clients send to have the rules choose (requests naming a real model "
        "or adapter are not selected).",
    )
    signals: list[Signal] = Field(
        default_factory=list,
        max_length=MAX_SIGNALS,
        description="Named tests of a request (unique names).",
        json_schema_extra=list_map(),
    )
    rules: list[SelectionRule] = Field(
        default_factory=list,
        max_length=MAX_SELECTION_RULES,
        description="Rules, highest priority first (list order between equals; unique names).",
        json_schema_extra=list_map(),
    )
    default: str | None = Field(
        default=None,
        min_length=1,
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description="Model or adapter for requests no rule matches (required when there are rules).",
    )

    @model_validator(mode="after")
    def _rules(self) -> ModelSelection:
        issues: list[Issue] = []
        issues += duplicates([s.name for s in self.signals], ".signals")
        issues += duplicates([r.name for r in self.rules], ".rules")
        known = {s.name for s in self.signals}
        for i, r in enumerate(self.rules):
            for path, name in expr_signals(r.when):
                if name not in known:
                    issues.append((f".rules[{i}]{path}", f"{KNOWN_SIGNALS_MESSAGE} (got {json.dumps(name)})"))
        if self.rules and self.default is None:
            issues.append((".default", RULE_DEFAULT_WITH_RULES.message))
        raise_issues(issues)
        return self

    def targets(self) -> list[tuple[str, str]]:
        """(field path relative to the spec, name) of every model or adapter the selection can send to."""
        out = [(f"rules[{i}].{'bandit.candidates' if r.bandit else 'target'}", t)
               for i, r in enumerate(self.rules) for t in r.targets()]  # fmt: skip
        if self.default is not None:
            out.append(("default", self.default))
        return out


# ------------------------------------------------------------------------------------- static analysis

MAX_LINT_SIGNALS = 16
"""Truth tables over more signals than this are not enumerated (the check is skipped for that rule)."""


def _exclusive(a: Signal, b: Signal) -> bool:
    """Whether signals ``a`` and ``b`` can never both be true (same kind, disjoint values or ranges)."""
    if a.prompt_tokens is not None and b.prompt_tokens is not None:
        lo = max(a.prompt_tokens.min or 0, b.prompt_tokens.min or 0)
        hi = min(
            a.prompt_tokens.max if a.prompt_tokens.max is not None else 1 << 40,
            b.prompt_tokens.max if b.prompt_tokens.max is not None else 1 << 40,
        )
        return lo > hi
    if a.header is not None and b.header is not None:
        return a.header.name == b.header.name and not set(a.header.values) & set(b.header.values)
    if a.tenant is not None and b.tenant is not None:
        return not set(a.tenant) & set(b.tenant)
    if a.language is not None and b.language is not None:
        return not set(a.language) & set(b.language)
    return False


class _Space:
    """The consistent truth assignments of some signals (mutually exclusive pairs excluded)."""

    def __init__(self, signals: Mapping[str, Signal], names: Sequence[str]) -> None:
        self.names = sorted(set(names))
        self.excl = [
            (a, b)
            for a, b in itertools.combinations(self.names, 2)
            if a in signals and b in signals and _exclusive(signals[a], signals[b])
        ]

    def assignments(self) -> Iterator[dict[str, bool]]:
        for bits in itertools.product((False, True), repeat=len(self.names)):
            v = dict(zip(self.names, bits, strict=True))
            if not any(v[a] and v[b] for a, b in self.excl):
                yield v


def _names(e: Expr) -> list[str]:
    return [n for _, n in expr_signals(e)]


def selection_lint(ms: ModelSelection) -> list[Issue]:
    """Rules that can never match (unsatisfiable, or shadowed by a higher-priority rule that is always
    true) and pairs of rules of equal priority that can match the same request (list order decides, which
    is easy to get wrong). Paths relative to ``spec.modelSelection``."""
    sigs = {s.name: s for s in ms.signals}
    issues: list[Issue] = []
    order = sorted(range(len(ms.rules)), key=lambda i: -ms.rules[i].priority)
    always: list[int] = []
    never: set[int] = set()
    for i in order:
        r = ms.rules[i]
        names = _names(r.when)
        if len(set(names)) > MAX_LINT_SIGNALS:
            continue
        outcomes = {expr_eval(r.when, v.__getitem__) for v in _Space(sigs, names).assignments()}
        if True not in outcomes:
            never.add(i)
            issues.append((f".rules[{i}].when", "can never be true (unreachable rule)"))
            continue
        shadow = next((j for j in always if ms.rules[j].priority > r.priority), None)
        if shadow is not None:
            issues.append((
                f".rules[{i}]",
                f'unreachable: rule "{ms.rules[shadow].name}" has a higher priority and is always true',
            ))  # fmt: skip
        if outcomes == {True}:
            always.append(i)
    for i, j in itertools.combinations(range(len(ms.rules)), 2):
        a, b = ms.rules[i], ms.rules[j]
        if a.priority != b.priority or i in never or j in never:
            continue
        names = _names(a.when) + _names(b.when)
        if len(set(names)) > MAX_LINT_SIGNALS:
            continue
        both = any(
            expr_eval(a.when, v.__getitem__) and expr_eval(b.when, v.__getitem__)
            for v in _Space(sigs, names).assignments()
        )
        if both:
            issues.append((
                f".rules[{j}]",
                f'overlaps rule "{a.name}" at the same priority ({a.priority}): a request can match both; '
                "give one a higher priority",
            ))  # fmt: skip
    return issues


def pool_issues(ms: ModelSelection, pool_name: str, names: set[str]) -> list[Issue]:
    """Targets that are not a model or adapter of the pool (``names``), and a selection ``model`` that hides
    one. Paths relative to ``spec.modelSelection``."""
    issues: list[Issue] = [
        (f".{path}", f'must name a model or adapter of ModelPool "{pool_name}" (got "{name}")')
        for path, name in ms.targets()
        if name not in names
    ]
    if ms.rules and ms.model in names:
        issues.append((".model", f'"{ms.model}" is a model or adapter of ModelPool "{pool_name}": pick '
                       "another name for selected requests"))  # fmt: skip
    return issues
