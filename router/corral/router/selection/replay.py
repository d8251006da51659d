"""``corral replay``: evaluate a model-selection policy offline against a router's decision log.

Shadow mode: the log holds what policy A (the one deployed) chose; :func:`replay` asks policy B what it
would have chosen for each logged request (same text, tenant, headers and token count) and reports how
often they agree, which rules of B fire, how choices move (A's model -> B's), and an estimate of B's mean
feedback score by the replay method (Li et al., 2011): only requests where B picks what A picked carry a
known reward; B's bandits learn from those rewards as they go, as they would have live. The estimate is
unbiased when A explored uniformly; otherwise read it as "score on the requests where B agrees with A".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.api.selection import ModelSelection

from .bandit import BanditStore, FeedbackLedger
from .log import read_log
from .selector import Selector
from .signals import RequestInfo


@dataclass
class ReplayReport:
    decisions: int = 0
    agree: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    changes: Counter[str] = field(default_factory=Counter)
    scored: int = 0  # decisions with feedback
    score_a: float = 0.0  # sum of A's feedback scores
    matched: int = 0  # scored decisions where B agrees with A
    score_b: float = 0.0  # sum of the scores of those
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        n = max(1, self.decisions)
        return {
            "decisions": self.decisions,
            "agreement": round(self.agree / n, 4),
            "rules_b": dict(self.rules.most_common()),
            "changes": dict(self.changes.most_common()),
            "feedback": {
                "scored": self.scored,
                "mean_score_a": round(self.score_a / self.scored, 4) if self.scored else None,
                "matched_b": self.matched,
                "mean_score_b_est": round(self.score_b / self.matched, 4) if self.matched else None,
            },
        }


def replay(
    log: str | Path, policy: ModelSelection, *, seed: int = 0, keep_rows: bool = False
) -> ReplayReport:
    """Run ``policy`` over the decisions of ``log`` (see the module docstring)."""
    records = list(read_log(log))
    scores = {r["request_id"]: float(r["score"]) for _, r in records if r["type"] == "feedback"}
    sel = Selector(policy, BanditStore(seed=seed), FeedbackLedger())
    rep = ReplayReport()
    for n, r in records:
        if r["type"] != "decision":
            continue
        try:
            info = RequestInfo(str(r.get("text") or ""), r.get("tenant"), dict(r.get("headers") or {}))
            info.n_tokens = int(r.get("prompt_tokens") or 0)
            a = str(r["model"])
            rid = str(r["request_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{log}:{n}: bad decision record ({e})") from None
        b = sel.select(info)
        rep.decisions += 1
        rep.rules[b.rule or "(default)"] += 1
        if a == b.model:
            rep.agree += 1
        else:
            rep.changes[f"{a} -> {b.model}"] += 1
        score = scores.get(rid)
        if score is not None:
            rep.scored += 1
            rep.score_a += score
            if a == b.model:
                rep.matched += 1
                rep.score_b += score
                if b.bandit is not None:  # B's bandit learns what it would have learnt live
                    sel.remember(rid, None, b, info)
                    sel.feedback(rid, None, score)
        if keep_rows:
            rep.rows.append({"request_id": rid, "a": a, "b": b.model, "rule_b": b.rule or "(default)",
                             "score": score})  # fmt: skip
    return rep
