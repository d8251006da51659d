"""Human-readable rendering of a model selection (``corral explain``): the chosen model and rule, each
signal the rules evaluated (value, true/false, in evaluation order) and a bandit's per-candidate scores."""

from __future__ import annotations

from typing import Any


def format_selection(sel: Any) -> str:
    """Lines for a ``corral.v1.Selection`` message (or anything with the same fields)."""
    lines = [f"selection: {sel.model} (rule {sel.rule}, {sel.elapsed_us:.0f} us)"]
    for name, value in sel.signals.items():
        mark = "true " if sel.matched.get(name, False) else "false"
        lines.append(f"  signal {name:<24} {mark} {value}")
    if len(sel.scores):
        lines.append(f"  bandit {sel.algorithm}:")
        lines.append("    arm                      score   predicted  bonus    cost     n")
        best = max(sel.scores, key=lambda s: s.score).arm
        for s in sel.scores:
            star = "*" if s.arm == best else " "
            nums = f"{s.score:7.3f} {s.predicted:9.3f} {s.bonus:7.3f} {s.cost:8.4f} {s.n:5d}"
            lines.append(f"  {star} {s.arm:<24} {nums}")
    return "\n".join(lines)
