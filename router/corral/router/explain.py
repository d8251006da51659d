"""Human-readable rendering of a routing ``Decision`` and its candidate cost terms (``corral explain``)."""

from __future__ import annotations

from .types import Decision


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_decision(decision: Decision) -> str:
    """The decision line, then one row per candidate (chosen first-marked with ``*``), times in ms."""
    lines = [f"policy {decision.policy} -> {decision.replica_id} (cached blocks {decision.cached_blocks})"]
    lines.append(f"reason: {decision.reason}")
    if not decision.candidates:
        return "\n".join(lines)
    head = [
        "",
        "replica",
        "gpu",
        "total_ms",
        "queue_ms",
        "prefill_ms",
        "adapter_ms",
        "cached",
        "tier",
        "extra",
    ]
    rows = [head]
    for c in decision.candidates:
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in c.extra.items() if k != "chosen")
        rows.append(
            [
                "*" if c.replica_id == decision.replica_id else "",
                c.replica_id,
                c.gpu_class,
                f"{c.total_s * 1e3:.2f}",
                f"{c.queue_s * 1e3:.2f}",
                f"{c.prefill_s * 1e3:.2f}",
                f"{c.adapter_s * 1e3:.2f}",
                str(c.cached_blocks),
                c.adapter_tier,
                extra,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(len(head) - 1)]
        lines.append("  ".join(cells) + "  " + row[-1])
    return "\n".join(line.rstrip() for line in lines)
