"""The selection runtime (corral.router.selection): lazy signals, rule order, embeddings, language, bandit
convergence on a stationary reward, state that survives a restart and merges across routers, feedback
errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from corral.api.selection import ModelSelection
from corral.router.selection import BanditStore, FeedbackError, FeedbackLedger, RequestInfo, compile_selection
from corral.router.selection.language import detect

SPEC: dict[str, Any] = {
    "signals": [
        {"name": "acme", "tenant": ["acme"]},
        {"name": "sql-task", "header": {"name": "x-corral-task", "values": ["sql"]}},
        {"name": "code", "keywords": ["def ", "#include", "import "]},
        {"name": "long", "promptTokens": {"min": 50}},
        {"name": "german", "language": ["de"]},
        {"name": "legal", "embedding": {"examples": [
            "review this contract clause for liability and indemnification",
            "is this non-disclosure agreement enforceable in court",
            "draft a termination clause for an employment contract"], "threshold": 0.25}},
    ],
    "rules": [
        {"name": "acme", "priority": 100, "when": {"signal": "acme"}, "target": "acme-chat"},
        {"name": "sql", "priority": 50, "when": {"any": [{"signal": "sql-task"}, {"signal": "code"}]},
         "target": "sql", "sampling": {"temperature": 0.0}},
        {"name": "legal", "priority": 40,
         "when": {"all": [{"signal": "legal"}, {"not": {"signal": "german"}}]}, "target": "legal"},
        {"name": "big", "priority": 10, "when": {"signal": "long"}, "target": "llama-70b"},
    ],
    "default": "llama-8b",
}  # fmt: skip


def selector(spec: dict[str, Any] = SPEC, **kw: Any) -> Any:
    s = compile_selection(ModelSelection.model_validate(spec), **kw)
    assert s is not None
    return s


def test_rules_by_priority_and_signals_only_as_needed() -> None:
    s = selector()
    counted: list[str] = []

    def count() -> int:
        counted.append("x")
        return 3

    sel = s.select(RequestInfo("review this contract clause", tenant="acme", count_tokens=count))
    assert (sel.model, sel.rule) == ("acme-chat", "acme")
    assert list(sel.signals) == ["acme"] and not counted  # nothing but the tenant was looked at
    sel = s.select(RequestInfo("please review this contract clause for liability", tenant="bob"))
    assert (sel.model, sel.rule) == ("legal", "legal")
    assert sel.matched == {"acme": False, "sql-task": False, "code": False, "german": False, "legal": True}
    assert 0.25 <= float(sel.signals["legal"]) <= 1.0
    sel = s.select(RequestInfo("import numpy as np", headers={}))
    assert (sel.model, sel.sampling.temperature if sel.sampling else None) == ("sql", 0.0)
    sel = s.select(RequestInfo("hi", headers={"x-corral-task": "sql"}))
    assert sel.rule == "sql" and "code" not in sel.signals  # any: the cheap header matched first
    sel = s.select(RequestInfo("tell me a story", count_tokens=lambda: 80))
    assert (sel.model, sel.signals["long"]) == ("llama-70b", 80)
    sel = s.select(RequestInfo("tell me a story", count_tokens=lambda: 5))
    assert (sel.model, sel.rule) == ("llama-8b", None)
    assert sel.to_dict()["rule"] == "(default)"


def test_each_signal_is_evaluated_at_most_once() -> None:
    spec = {**SPEC, "rules": [
        {"name": "a", "priority": 2, "when": {"all": [{"signal": "long"}, {"signal": "code"}]},
         "target": "x"},
        {"name": "b", "priority": 1, "when": {"all": [{"signal": "long"}, {"signal": "german"}]},
         "target": "y"},
    ]}  # fmt: skip
    calls: list[int] = []
    sel = selector(spec).select(
        RequestInfo("Das ist nicht gut und ich weiß es", count_tokens=lambda: calls.append(1) or 99)
    )
    assert sel.model == "y" and len(calls) == 1


def test_language_detector() -> None:
    assert detect("What is the capital of France and how big is it?") == "en"
    assert detect("Ich weiß nicht, wie das mit der Steuer ist und was ich tun soll") == "de"
    assert detect("Je ne sais pas si le contrat est valide pour vous") == "fr"
    assert detect("¿Cuál es la mejor manera de aprender para el examen con los libros?") == "es"
    assert detect("这个合同条款是否有效") == "zh"
    assert detect("この契約は有効ですか") == "ja"
    assert detect("Как дела у тебя сегодня") == "ru"  # noqa: RUF001
    assert detect("12345 !!!") == ""


def _reward(arm: str, x: float) -> float:
    # stationary: 'good' is better for every context, by a margin that depends on x
    return 0.8 - 0.1 * x if arm == "good" else 0.3 + 0.1 * x


@pytest.mark.parametrize("algorithm", ["linucb", "thompson"])
def test_bandit_converges_on_a_stationary_reward(algorithm: str) -> None:
    spec = {
        "signals": [{"name": "any", "promptTokens": {"min": 0}}],
        "rules": [{"name": "learn", "when": {"signal": "any"},
                   "bandit": {"candidates": ["bad", "good"], "algorithm": algorithm, "alpha": 0.5}}],
        "default": "bad",
    }  # fmt: skip
    s = selector(spec, store=BanditStore(seed=7))
    rng = np.random.default_rng(1)
    picks = []
    for i in range(400):
        n = int(rng.integers(1, 2000))
        sel = s.select(RequestInfo("q", count_tokens=lambda n=n: n))
        s.remember(f"r{i}", None, sel, RequestInfo("q", count_tokens=lambda n=n: n))
        r = _reward(sel.model, np.log1p(n) / 10) + rng.normal(0, 0.05)
        s.feedback(f"r{i}", None, float(np.clip(r, 0, 1)))
        picks.append(sel.model)
    assert picks[-100:].count("good") >= 90, picks[-100:]
    sel = s.select(RequestInfo("q", count_tokens=lambda: 100))
    assert sel.forecast is not None and sel.forecast["good"] > 0.9  # the pager's demand forecast
    assert picks[:20].count("bad") >= 1  # it explored


def test_cost_term_steers_to_the_cheaper_arm() -> None:
    spec = {
        "signals": [{"name": "any", "promptTokens": {"min": 0}}],
        "rules": [{"name": "c", "when": {"signal": "any"},
                   "bandit": {"candidates": ["big", "small"], "alpha": 0.0, "costWeight": 1.0}}],
        "default": "big",
    }  # fmt: skip
    s = selector(spec)
    sel = s.select(RequestInfo("q"), cost=lambda arm, n: 2.0 if arm == "big" else 0.1)
    assert sel.model == "small" and sel.bandit is not None
    assert {b.arm: b.cost for b in sel.bandit} == {"big": 2.0, "small": 0.1}


def test_state_survives_restart_and_merges_across_routers(tmp_path: Path) -> None:
    a = BanditStore(tmp_path, "router-a", flush_s=0.0)
    a.update("rule", "arm", [1.0, 0.5], 1.0)
    a.close()
    again = BanditStore(tmp_path, "router-a")  # restart, same id: its own file comes back
    _, b, n = again.totals("rule\x1farm", 2)
    assert n == 1 and b.tolist() == [1.0, 0.5]
    other = BanditStore(tmp_path, "router-b", flush_s=0.0, sync_s=0.0)  # an active-active peer
    other.update("rule", "arm", [1.0, 0.0], 0.5)
    again.sync(force=True)
    _, b, n = again.totals("rule\x1farm", 2)
    assert n == 2 and b.tolist() == [1.5, 0.5]  # additive: own + peer, nothing counted twice
    again.update("rule", "arm", [1.0, 0.0], 1.0)
    again.flush()
    other.sync(force=True)
    assert other.totals("rule\x1farm", 2)[2] == 3
    (tmp_path / "router-c.json").write_text("{not json")  # a broken peer file is ignored, not fatal
    again.sync(force=True)
    assert again.totals("rule\x1farm", 2)[2] == 3


def test_feedback_errors() -> None:
    s = selector()
    info = RequestInfo("x", tenant="bob", count_tokens=lambda: 1)
    sel = s.select(info)
    s.remember("req-1", "bob", sel, info)
    with pytest.raises(FeedbackError, match="unknown request id 'nope'") as e:
        s.feedback("nope", "bob", 1.0)
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:
        s.feedback("req-1", "eve", 1.0)  # another tenant's id: not found, not forbidden
    assert e.value.status == 404
    with pytest.raises(FeedbackError, match=r"field 'score' must be in \[0, 1\]") as e:
        s.feedback("req-1", "bob", 3)
    assert e.value.status == 400
    got = s.feedback("req-1", "bob", 0.5)
    assert got == {"request_id": "req-1", "model": "llama-8b", "rule": "(default)", "learned": False}
    with pytest.raises(FeedbackError) as e:
        s.feedback("req-1", "bob", 0.5)
    assert e.value.status == 409
    ledger = FeedbackLedger(capacity=2)
    for i in range(3):
        s2 = selector(ledger=ledger)
        s2.remember(f"q{i}", None, sel, info)
    assert list(ledger.items) == ["q1", "q2"]


NAMES = ("acme", "sql-task", "code", "long", "german")


def _expr(depth: int) -> Any:
    from hypothesis import strategies as st

    leaf = st.sampled_from(NAMES).map(lambda n: {"signal": n})
    if depth == 3:
        return st.one_of(leaf, leaf.map(lambda x: {"not": x}))
    kids = st.lists(_expr(depth + 1), min_size=1, max_size=3)
    return st.one_of(leaf, kids.map(lambda k: {"all": k}), kids.map(lambda k: {"any": k}),
                     _expr(depth + 1).map(lambda x: {"not": x}))  # fmt: skip


def test_compiled_rules_agree_with_the_plain_evaluation() -> None:
    """Reordering children cheapest-first and evaluating lazily never changes a rule's outcome."""
    from corral.api.selection import expr_eval
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=150, deadline=None)
    @given(_expr(1), st.fixed_dictionaries({n: st.booleans() for n in NAMES}))
    def check(when: dict[str, Any], truth: dict[str, bool]) -> None:
        spec = {"signals": [{"name": n, "header": {"name": f"x-{n}", "values": ["1"]}} for n in NAMES],
                "rules": [{"name": "r", "when": when, "target": "hit"}], "default": "miss"}  # fmt: skip
        s = selector(spec)
        headers = {f"x-{n}": "1" for n, t in truth.items() if t}
        sel = s.select(RequestInfo("x", headers=headers))
        expected = expr_eval(s.spec.rules[0].when, truth.__getitem__)
        assert (sel.model == "hit") == expected
        assert set(sel.signals) <= set(NAMES) and all(sel.matched[n] == truth[n] for n in sel.signals)

    check()


def test_feedback_reaches_any_router_sharing_the_state_folder(tmp_path: Path) -> None:
    """Active-active: router B takes feedback for a request router A selected; a second score at either
    router is 409; an unknown id is still 404 at both."""
    spec = {
        "signals": [{"name": "any", "promptTokens": {"min": 0}}],
        "rules": [{"name": "learn", "when": {"signal": "any"}, "bandit": {"candidates": ["x", "y"]}}],
        "default": "x",
    }
    a = selector(spec, store=BanditStore(tmp_path, "router-a", flush_s=0.0, sync_s=0.0))
    b = selector(spec, store=BanditStore(tmp_path, "router-b", flush_s=0.0, sync_s=0.0))
    info = RequestInfo("q", tenant="acme", count_tokens=lambda: 10)
    sel = a.select(info)
    a.remember("req-1", "acme", sel, info)
    with pytest.raises(FeedbackError) as e:
        b.feedback("req-1", "bob", 1.0)  # another tenant: unknown, even via the peer
    assert e.value.status == 404
    got = b.feedback("req-1", "acme", 1.0)
    assert got == {"request_id": "req-1", "model": sel.model, "rule": "learn", "learned": True}
    for router in (a, b):
        with pytest.raises(FeedbackError) as e:
            router.feedback("req-1", "acme", 0.0)
        assert e.value.status == 409
    a.store.sync(force=True)
    assert a.store.totals(f"learn\x1f{sel.model}", 3)[2] == 1  # B's reward reached A's statistics
    with pytest.raises(FeedbackError, match="routers sharing its state folder") as e:
        a.feedback("req-2", "acme", 1.0)
    assert e.value.status == 404


def test_shared_ledger_rotates_and_still_finds_recent_ids(tmp_path: Path) -> None:
    from corral.router.selection.bandit import Pending
    from corral.router.selection.shared import SharedLedger

    a, b = SharedLedger(tmp_path, "a", capacity=2), SharedLedger(tmp_path, "b", capacity=2)
    for i in range(5):
        a.publish(f"r{i}", Pending("t", "m", "rule", [1.0]))
    assert (tmp_path / "a.ledger.old.jsonl").exists()
    assert b.find("r4") is not None and b.find("r3") is not None  # the current and the rotated file
    assert b.find("r0") is None  # beyond two capacities: forgotten
    assert b.find("r") is None  # ids match whole
    a.close()
    b.close()
