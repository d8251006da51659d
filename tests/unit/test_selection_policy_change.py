"""Model selection across a live policy change (request-path review): no server needed."""

from __future__ import annotations

from corral.api.selection import ModelSelection
from corral.router.selection import RequestInfo, compile_selection
from corral.router.selection.bandit import BanditStore, FeedbackLedger


def _policy(rule: str) -> ModelSelection:
    return ModelSelection.model_validate({
        "signals": [{"name": "learn", "header": {"name": "x-corral-task", "values": ["learn"]}}],
        "rules": [{"name": rule, "when": {"signal": "learn"}, "bandit": {"candidates": ["a", "b"]}}],
        "default": "a",
    })  # fmt: skip


def test_a_request_selected_before_a_policy_change_is_remembered_and_learnt_from() -> None:
    # The router remembers a selection when it dispatches the request, with the selector in force then:
    # the RoutingPolicy may have changed while the request was being prepared (tokenizer load, a big
    # prompt tokenized in a thread). That used to raise StopIteration (the bandit rule was gone) inside
    # Router.stream: a 500 for a request that had been chosen fine.
    store, ledger = BanditStore(), FeedbackLedger()
    old = compile_selection(_policy("learn"), store, ledger)
    assert old is not None
    info = RequestInfo("q", None, {"x-corral-task": "learn"})
    sel = old.select(info)
    assert sel.rule == "learn" and sel.bandit is not None
    new = compile_selection(_policy("renamed"), store, ledger)  # the policy changed meanwhile
    assert new is not None
    new.remember("r1", None, sel, info)
    got = new.feedback("r1", None, 1.0)
    assert got == {"request_id": "r1", "model": sel.model, "rule": "learn", "learned": True}
    assert store.totals(f"learn\x1f{sel.model}", 3)[2] == 1  # the rule that chose it learnt the reward
