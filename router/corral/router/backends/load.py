"""A backend's load as the policies read it: this router's live counts plus the scraped load it did not send.

A ``/metrics`` scrape is a snapshot taken some time ago; requests this router sent since have started,
finished or been queued, and the router knows that exactly and now. So a scrape is split into what this
router itself had on the backend when it scraped (its own in-flight requests, which it keeps counting
live) and the rest, *external* load (other routers, clients going straight to the backend). The policies
read a :class:`ScrapedLoad` where they read an engine's :class:`~corral.router.events.LoadSample`
(``running``, ``waiting``, ``waiting_prefill_tokens``, ``kv_usage``); its counts are the router's own live
counts plus the external part weighted by ``1 - age / max_age`` (age since the scrape was sent), so an old
scrape fades instead of pinning a drained backend as busy until the next one. A scrape older than
``max_age`` is ignored altogether by the policies (``sample_max_age_s``).
"""

from __future__ import annotations

from collections.abc import Callable

from ..state import ReplicaState

DEFAULT_PROMPT_TOKENS = 512  # external requests' prefill size until this router has sent some


class ScrapedLoad:
    """Duck-types :class:`~corral.router.events.LoadSample` (see the module docstring)."""

    __slots__ = ("_clock", "ext_running", "ext_tokens", "ext_waiting", "kv_usage", "max_age", "r",
                 "replica_id", "sent_at", "time")  # fmt: skip

    def __init__(
        self,
        r: ReplicaState,
        *,
        running: int,
        waiting: int,
        kv_usage: float,
        own_at_scrape: int,
        sent_at: float,
        wall_time: float,
        clock: Callable[[], float],
        max_age: float,
    ) -> None:
        self.r = r
        self.replica_id = r.replica_id
        self.time = wall_time
        self.sent_at = sent_at
        self._clock = clock
        self.max_age = max(1e-3, max_age)
        self.kv_usage = kv_usage
        own = max(own_at_scrape, len(r.in_flight))  # ours on it when the backend counted (bounds both ends)
        ext = max(0, running + waiting - own)
        self.ext_waiting = min(ext, waiting)
        self.ext_running = ext - self.ext_waiting
        own_waiting = len(r.in_flight) - r.decode_requests
        per = r.pending_prefill_tokens / own_waiting if own_waiting > 0 else DEFAULT_PROMPT_TOKENS
        self.ext_tokens = int(self.ext_waiting * per)

    def weight(self) -> float:
        """How much the external part still counts: 1 when just scraped, 0 at ``max_age``."""
        return max(0.0, 1.0 - (self._clock() - self.sent_at) / self.max_age)

    @property
    def waiting(self) -> int:
        r = self.r
        return len(r.in_flight) - r.decode_requests + round(self.ext_waiting * self.weight())

    @property
    def running(self) -> int:
        return self.r.decode_requests + round(self.ext_running * self.weight())

    @property
    def waiting_prefill_tokens(self) -> int:
        return self.r.pending_prefill_tokens + int(self.ext_tokens * self.weight())

    @property
    def running_tokens(self) -> int:
        return 0

    def __repr__(self) -> str:
        return (f"ScrapedLoad({self.replica_id}: running={self.running} waiting={self.waiting} "
                f"external={self.ext_running}+{self.ext_waiting} kv={self.kv_usage:.2f})")  # fmt: skip
