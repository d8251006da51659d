"""ScrapedLoad: a scraped load = this router's live counts + what it did not send, fading with age."""

from __future__ import annotations

from corral.api.profiles import resolve_profile
from corral.router.backends.load import ScrapedLoad
from corral.router.policies._common import request_load, waiting_load
from corral.router.request import build_request
from corral.router.state import FleetState


def _fleet() -> FleetState:
    f = FleetState(index_mode="approximate")
    f.add_replica("r0", model="m", gpu_class="H100", profile=resolve_profile("H100"))
    return f


def test_own_requests_are_counted_live_and_external_load_fades_with_age() -> None:
    f = _fleet()
    r = f.replicas["r0"]
    for i in range(3):
        f.on_dispatch(
            "r0", build_request(f"q{i}", "m", tokens=list(range(100 * i, 100 * i + 64)), max_tokens=4)
        )
    now = [10.0]
    # the backend reports 3 running + 5 waiting; 3 of those 8 are ours -> 5 external, all waiting
    s = ScrapedLoad(r, running=3, waiting=5, kv_usage=0.4, own_at_scrape=3, sent_at=10.0, wall_time=0.0,
                    clock=lambda: now[0], max_age=5.0)  # fmt: skip
    assert (s.ext_waiting, s.ext_running) == (5, 0)
    assert s.waiting == 3 + 5 and s.running == 0 and s.kv_usage == 0.4
    assert s.waiting_prefill_tokens == r.pending_prefill_tokens + 5 * 64  # external ~ our prompts' size
    r.set_sample(s, 10.0, live=True)  # type: ignore[arg-type]
    assert waiting_load(r, 10.0, 5.0) == 8 and request_load(r, 10.0, 5.0) == 8
    # ours finish: the sample follows at once (no stale "busy" until the next scrape)
    for i in range(3):
        f.on_finish("r0", f"q{i}")
    assert s.waiting == 5
    now[0] = 12.5  # half the max age: external counts half
    assert s.waiting == 2 or s.waiting == 3  # round(2.5)
    now[0] = 15.0
    assert s.waiting == 0 and s.waiting_prefill_tokens == 0
    assert waiting_load(r, 15.5, 5.0) == 0  # and the policies drop it past its age


def test_a_scrape_of_only_our_requests_adds_nothing() -> None:
    f = _fleet()
    r = f.replicas["r0"]
    for i in range(4):
        f.on_dispatch("r0", build_request(f"q{i}", "m", tokens=list(range(32)), max_tokens=4))
    f.on_first_token("r0", "q0")
    s = ScrapedLoad(r, running=2, waiting=2, kv_usage=0.1, own_at_scrape=4, sent_at=0.0, wall_time=0.0,
                    clock=lambda: 0.0, max_age=5.0)  # fmt: skip
    assert (s.ext_running, s.ext_waiting) == (0, 0)
    assert (s.running, s.waiting) == (1, 3)  # the router's own view: 1 past its first token, 3 waiting
