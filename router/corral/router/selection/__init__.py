"""Model and adapter selection at run time (RoutingPolicy ``spec.modelSelection``, issue 15).

* :mod:`.signals` evaluates a request's signals lazily (each at most once, cheap ones first, only those a
  rule asks for); :mod:`.embed` and :mod:`.language` are the CPU embedding and language detector behind
  the ``embedding`` and ``language`` signals;
* :mod:`.selector` compiles a :class:`~corral.api.selection.ModelSelection` into a :class:`Selector` and
  picks a target per request, with the trace :class:`Selection` that Explain and spans show;
* :mod:`.bandit` holds the contextual bandits (LinUCB, Thompson sampling) over a rule's candidates, their
  persistent and mergeable state, and the feedback ledger (request id -> what was chosen, for rewards).
"""

from __future__ import annotations

from .bandit import BanditStore, FeedbackError, FeedbackLedger
from .selector import RequestInfo, Selection, Selector, compile_selection

__all__ = [
    "BanditStore",
    "FeedbackError",
    "FeedbackLedger",
    "RequestInfo",
    "Selection",
    "Selector",
    "compile_selection",
]
