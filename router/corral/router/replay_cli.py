"""``corral replay``: evaluate a RoutingPolicy's model selection offline against a router's decision log
(``python -m corral.router.server --selection-log FILE``) — shadow mode: what the deployed policy chose
next to what this one would have chosen, their agreement, and an estimate of this policy's mean feedback
score."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "replay", help="Evaluate a model-selection policy against a decision log.", description=__doc__
    )
    p.add_argument("policy", metavar="POLICY.yaml", help="the RoutingPolicy to evaluate (its modelSelection)")
    p.add_argument("--log", required=True, metavar="FILE", help="decision log (the router's --selection-log)")
    p.add_argument("--rows", metavar="FILE", help="also write one JSON line per decision (A, B, score)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from corral.api.models import RoutingPolicy
    from corral.api.validation import validate_paths

    from .selection.replay import replay

    report = validate_paths([args.policy])
    if not report.ok:
        for problem in report.problems:
            print(problem, file=sys.stderr)
        return 1
    policies = [o for o in report.objects if isinstance(o, RoutingPolicy)]
    if len(policies) != 1:
        print(f"error: {args.policy}: expected one RoutingPolicy, found {len(policies)}", file=sys.stderr)
        return 1
    ms = policies[0].spec.model_selection
    if not ms.rules and ms.default is None:
        print(f"error: {args.policy}: spec.modelSelection has no rules and no default", file=sys.stderr)
        return 1
    try:
        rep = replay(args.log, ms, keep_rows=bool(args.rows))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.rows:
        Path(args.rows).write_text("".join(json.dumps(r) + "\n" for r in rep.rows))
    out = rep.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    fb = out["feedback"]
    print(
        f"{out['decisions']} decisions; policy {policies[0].metadata.name} agrees on {out['agreement']:.1%}"
    )
    print("rules (this policy): " + ", ".join(f"{k} {v}" for k, v in out["rules_b"].items()))
    for change, n in out["changes"].items():
        print(f"  {change}: {n}")
    if fb["scored"]:
        est = "n/a" if fb["mean_score_b_est"] is None else f"{fb['mean_score_b_est']:.3f}"
        print(f"feedback: {fb['scored']} scored, deployed mean {fb['mean_score_a']:.3f}; this policy "
              f"(replay estimate over {fb['matched_b']} matching) {est}")  # fmt: skip
    return 0
