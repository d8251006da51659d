"""The model-selection schema's static analysis (corral.api.selection.selection_lint, pool_issues) and how
``corral validate`` reports it: overlapping rules of equal priority, unreachable rules, missing targets."""

from __future__ import annotations

from typing import Any

from corral.api.models import ModelPool, RoutingPolicy
from corral.api.selection import ModelSelection, expr_eval, pool_issues, selection_lint
from corral.api.validation import cross_problems

SIGNALS = [
    {"name": "code", "keywords": ["def"]},
    {"name": "short", "promptTokens": {"max": 100}},
    {"name": "long", "promptTokens": {"min": 1000}},
    {"name": "sql-task", "header": {"name": "x-corral-task", "values": ["sql"]}},
    {"name": "chat-task", "header": {"name": "x-corral-task", "values": ["chat"]}},
]


def sel(*rules: dict[str, Any], default: str = "base") -> ModelSelection:
    return ModelSelection.model_validate({"signals": SIGNALS, "rules": list(rules), "default": default})


def rule(name: str, when: dict[str, Any], priority: int = 0, target: str = "t") -> dict[str, Any]:
    return {"name": name, "when": when, "priority": priority, "target": target}


def test_expressions_evaluate_lazily_in_order() -> None:
    ms = sel(
        rule("a", {"any": [{"signal": "code"}, {"all": [{"signal": "long"}, {"not": {"signal": "short"}}]}]})
    )
    asked: list[str] = []

    def value(truth: dict[str, bool]) -> Any:
        def get(name: str) -> bool:
            asked.append(name)
            return truth[name]

        return get

    assert expr_eval(ms.rules[0].when, value({"code": True}))
    assert asked == ["code"]  # any: the first true child ends it
    asked.clear()
    assert expr_eval(ms.rules[0].when, value({"code": False, "long": True, "short": False}))
    assert not expr_eval(ms.rules[0].when, value({"code": False, "long": False}))


def test_equal_priority_rules_that_can_both_match_are_reported() -> None:
    ms = sel(rule("a", {"signal": "code"}), rule("b", {"signal": "long"}))
    assert selection_lint(ms) == [
        (
            ".rules[1]",
            'overlaps rule "a" at the same priority (0): a request can match both; give one a '
            "higher priority",
        )
    ]
    assert selection_lint(sel(rule("a", {"signal": "code"}), rule("b", {"signal": "long"}, priority=1))) == []


def test_exclusive_signals_do_not_overlap() -> None:
    # disjoint token ranges, and one header with disjoint values, can never both be true
    assert selection_lint(sel(rule("a", {"signal": "short"}), rule("b", {"signal": "long"}))) == []
    assert selection_lint(sel(rule("a", {"signal": "sql-task"}), rule("b", {"signal": "chat-task"}))) == []
    both = {"all": [{"signal": "short"}, {"signal": "long"}]}
    assert selection_lint(sel(rule("a", both))) == [
        (".rules[0].when", "can never be true (unreachable rule)")
    ]


def test_rules_shadowed_by_an_always_true_rule_are_unreachable() -> None:
    always = {"any": [{"signal": "code"}, {"not": {"signal": "code"}}]}
    ms = sel(rule("catch-all", always, priority=5), rule("later", {"signal": "long"}))
    assert selection_lint(ms) == [
        (".rules[1]", 'unreachable: rule "catch-all" has a higher priority and is always true')
    ]


def test_targets_must_be_in_the_pool() -> None:
    ms = ModelSelection.model_validate(
        {"signals": SIGNALS, "default": "llama",
         "rules": [{"name": "b", "when": {"signal": "code"}, "bandit": {"candidates": ["llama", "ghost"]}}]}
    )  # fmt: skip
    assert pool_issues(ms, "p", {"llama", "sql"}) == [
        (".rules[0].bandit.candidates", 'must name a model or adapter of ModelPool "p" (got "ghost")')
    ]
    auto = ModelSelection.model_validate({**ms.model_dump(by_alias=True), "model": "sql"})
    assert pool_issues(auto, "p", {"llama", "sql", "ghost"})[0][0] == ".model"


def test_validate_and_admission_report_lint_with_paths() -> None:
    pool = ModelPool.model_validate({
        "apiVersion": "corral.dev/v1alpha1", "kind": "ModelPool", "metadata": {"name": "p"},
        "spec": {"models": [{"name": "llama", "baseModel": "org/llama"}],
                 "gpuClasses": [{"name": "h100", "maxReplicas": 1}]},
    })  # fmt: skip
    ms = {
        "signals": SIGNALS,
        "default": "llama",
        "rules": [
            rule("a", {"signal": "code"}, target="llama"),
            rule("b", {"signal": "long"}, target="gone"),
        ],
    }
    rp = RoutingPolicy.model_validate({
        "apiVersion": "corral.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"poolRef": "p", "modelSelection": ms},
    })  # fmt: skip
    got = [
        str(p).removeprefix("a.yaml: RoutingPolicy/p: ")
        for p in cross_problems([(pool, "a.yaml"), (rp, "a.yaml")])
    ]
    assert got == [
        'spec.modelSelection.rules[1]: overlaps rule "a" at the same priority (0): a '
        "request can match both; give one a higher priority",
        'spec.modelSelection.rules[1].target: must name a model or adapter of ModelPool "p" (got "gone")',
    ]


def test_admission_denies_a_change_that_adds_an_unreachable_rule() -> None:
    from corral.api.validation import admission_problems

    def policy(rules: list[dict[str, Any]]) -> RoutingPolicy:
        return RoutingPolicy.model_validate({
            "apiVersion": "corral.dev/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
            "spec": {"poolRef": "p", "modelSelection": {"signals": SIGNALS, "rules": rules, "default": "t"}},
        })  # fmt: skip

    old = policy([rule("a", {"signal": "code"}, priority=1)])
    always = {"any": [{"signal": "code"}, {"not": {"signal": "code"}}]}
    new = policy([rule("a", {"signal": "code"}, priority=1), rule("all", always, priority=9)])
    got = [str(p) for p in admission_problems(new, [], old)]
    msg = 'unreachable: rule "all" has a higher priority and is always true'
    assert got == [f"RoutingPolicy/p: spec.modelSelection.rules[0]: {msg}"]
    assert admission_problems(old, [], None) == []
