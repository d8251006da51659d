"""The decision log of model selection: one JSON line per selected request, and one per feedback.

Opt-in (``RouterConfig.selection_log`` / ``python -m corral.router.server --selection-log FILE``) because
it records what signals read: the request's text (cut to :data:`MAX_TEXT_CHARS`), its tenant and its
``x-*`` headers (never credentials). ``corral replay`` evaluates another policy against it offline
(:mod:`.replay`).

Lines::

    {"type": "decision", "request_id", "t", "tenant", "headers", "text", "prompt_tokens", "model", "rule",
     "signals", "shadow": {"model", "rule"} (with a shadow policy)}
    {"type": "feedback", "request_id", "t", "score"}
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from .selector import Selection
from .signals import RequestInfo

MAX_TEXT_CHARS = 8192


def loggable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``x-*`` headers (task tags and the like); credentials are never among them."""
    return {k: v for k, v in headers.items() if k.startswith("x-") and k != "x-api-key"}


class DecisionLog:
    """Appends decision and feedback lines to a file (line-buffered; safe from several threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO = self.path.open("a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def _write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._f.write(line + "\n")

    def decision(self, request_id: str, tenant: str | None, info: RequestInfo, sel: Selection) -> None:
        self._write({
            "type": "decision", "request_id": request_id, "t": time.time(), "tenant": tenant,
            "headers": loggable_headers(info.headers), "text": info.text[:MAX_TEXT_CHARS],
            "prompt_tokens": info.tokens(), "model": sel.model, "rule": sel.rule, "signals": sel.signals,
            **({"shadow": sel.shadow} if sel.shadow is not None else {}),
        })  # fmt: skip

    def feedback(self, request_id: str, score: float) -> None:
        self._write({"type": "feedback", "request_id": request_id, "t": time.time(), "score": score})

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # a full volume: the last line is lost, not the stop
            self._f.close()


def read_log(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a decision log; a malformed line raises ValueError naming it."""
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or obj.get("type") not in ("decision", "feedback"):
                raise ValueError(f"{path}:{n}: not a decision or feedback record")
            yield n, obj
