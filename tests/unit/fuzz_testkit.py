"""Shared kit of the hostile-input (fuzz) tests: the hypothesis budget, the count of inputs tried, a real
router over sim engines on 127.0.0.1 running in a background event loop (so hypothesis drives it from
plain synchronous tests), a raw-socket HTTP client, and the leak check (no in-flight slot, no task left).

Budget: ``CORRAL_FUZZ_SCALE`` (default 1) multiplies every test's ``max_examples``; CI runs scale 1
(seconds), ``scripts/fuzz_report.py`` runs a larger scale and records the counts. ``CORRAL_FUZZ_COUNTS``
names a JSON file that receives ``{test: inputs tried}`` when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

T = TypeVar("T")

SCALE = max(1, int(os.environ.get("CORRAL_FUZZ_SCALE", "1")))
COUNTS: Counter[str] = Counter()
MODEL = "llama-8b"
TASK_SLACK = 16
ADAPTER = "sql-lora"


def fuzz_settings(examples: int) -> settings:
    """``examples`` inputs at scale 1 (CI), ``examples * CORRAL_FUZZ_SCALE`` in the report run."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,  # CI: the same inputs every run; the report run explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )


def tried(name: str, n: int = 1) -> None:
    """Count ``n`` hostile inputs sent by test ``name``."""
    COUNTS[name] += n


def _dump_counts() -> None:
    path = os.environ.get("CORRAL_FUZZ_COUNTS")
    if not path or not COUNTS:
        return
    old: dict[str, int] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    for k, v in COUNTS.items():
        old[k] = old.get(k, 0) + v
    with open(path, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)


atexit.register(_dump_counts)


# ---- a real router over sim engines, in a background loop -----------------------------------------------
class Harness:
    """Two sim engines (H100, A100) behind gRPC endpoints and one router (gRPC + HTTP) on 127.0.0.1, run by
    an event loop in a background thread; tests call :meth:`run` with coroutines for that loop."""

    def __init__(
        self, time_scale: float = 50.0, http_kw: dict[str, Any] | None = None, **router_cfg: Any
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-harness", daemon=True)
        self.thread.start()
        self.time_scale = time_scale
        self.router_cfg = router_cfg
        self.http_kw = http_kw or {}  # HttpApi's limits (timeouts), for the slow-client tests
        self.server: Any = None
        self.endpoints: list[Any] = []
        self.engines: list[Any] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        from corral.router.server import RouterConfig, RouterServer
        from corral.serve.endpoint import EngineEndpoint
        from corral.serve.endpoint.sim import SimEndpointEngine

        for i, prof in enumerate(["H100", "A100-80GB"]):
            eng = SimEndpointEngine.create(
                prof, f"fz-{i}", MODEL, time_scale=self.time_scale, max_model_len=4096
            )
            ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
            self.engines.append(eng)
            self.endpoints.append(ep)
        cfg = {"policy": "corral", "adapters": {ADAPTER: (MODEL, "")}, **self.router_cfg}
        self.server = RouterServer([e.address for e in self.endpoints], RouterConfig(**cfg))
        if self.http_kw:
            from corral.router.server.http_api import HttpApi

            self.server.http = HttpApi(self.server.router, **self.http_kw)
        await self.server.start("127.0.0.1", 0, 0)
        await self.server.wait_for_replicas(2, timeout=20)

    async def _stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
        for ep, eng in zip(self.endpoints, self.engines, strict=True):
            await ep.stop(None)
            close = getattr(eng, "close", None)
            if close is not None:
                await close()

    def start(self) -> Harness:
        self.run(self._start())
        return self

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def http_port(self) -> int:
        return int(self.server.http_url.rsplit(":", 1)[1])

    @property
    def grpc_address(self) -> str:
        return str(self.server.grpc_address)

    # ---- accounting ------------------------------------------------------------------------------------
    def dispatched(self) -> int:
        """Requests the router's core accounts to a replica (dispatched, not finished)."""

        async def count() -> int:
            return sum(len(r.in_flight) for r in self.server.router.fleet.replicas.values())

        return self.run(count())

    def in_flight(self) -> int:
        """Requests the router still holds: accounted to a replica by its core (dispatched, not finished),
        waiting in or admitted by its admission control (queued, in flight per tenant, reserved)."""

        async def count() -> int:
            router = self.server.router
            n = sum(len(r.in_flight) for r in router.fleet.replicas.values())
            adm = getattr(router, "admission", None)
            if adm is not None:
                n += adm.waiting + sum(waiting + inflight for _, waiting, inflight, _ in adm.stats())
                n += sum(adm.reserved.values())
            return n

        return self.run(count())

    def engine_running(self) -> int:
        """Requests the sim engines still hold (queued or running)."""

        async def count() -> int:
            return sum(int(e.sim.num_in_system) for e in self.engines)

        return self.run(count())

    def tasks(self) -> int:
        """The event loop's tasks, less grpc's server-side pool of tasks awaiting new calls
        (``AioServer.*``: grpc keeps more of them after a burst, bounded by grpc, not per request)."""
        kinds = self.task_kinds()
        return sum(n for k, n in kinds.items() if not k.startswith(("AioServer.", "Harness.")))

    def task_kinds(self) -> dict[str, int]:
        """The event loop's tasks by coroutine name (what a leak is made of)."""

        async def kinds() -> dict[str, int]:
            coros = (t.get_coro() for t in asyncio.all_tasks())
            return dict(Counter(getattr(c, "__qualname__", type(c).__name__) for c in coros))

        return self.run(kinds())

    def request_codes(self) -> dict[str, float]:
        """``corral_requests_total`` by status code (all fronts), from the router's metrics."""
        text = self.server.router.metrics.render().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("corral_requests_total{"):
                labels, _, value = line.rpartition(" ")
                code = labels.split('code="', 1)[1].split('"', 1)[0]
                out[code] = out.get(code, 0.0) + float(value)
        return out

    def settle(self, baseline_tasks: int | None = None, timeout: float = 20.0) -> None:
        """Wait until nothing is in flight in the router (and, given a baseline, at most :data:`TASK_SLACK`
        more asyncio tasks than it: connection-level tasks of the engine links may be added under load, a
        leak per request would be thousands); raise naming what is left."""
        t0 = time.monotonic()
        while True:
            inflight = self.in_flight()
            ntasks = self.tasks()
            if inflight == 0 and (baseline_tasks is None or ntasks <= baseline_tasks + TASK_SLACK):
                return
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"leak after {timeout}s: {inflight} request(s) still in flight in the router, "
                    f"{ntasks} asyncio tasks (baseline {baseline_tasks}): {self.task_kinds()}"
                )
            time.sleep(0.05)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness().start()
    try:
        yield h
    finally:
        h.stop()


# ---- raw HTTP -----------------------------------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_http(port: int, data: bytes, timeout: float = 30.0) -> RawResponse | None:
    """Send ``data`` as-is on a new connection, read until the server closes it. ``None``: the server
    closed the connection without a response (a clean close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        chunks = []
        try:
            while b := s.recv(65536):
                chunks.append(b)
        except ConnectionResetError:
            pass
    raw = b"".join(chunks)
    if not raw:
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def _dechunk(body: bytes) -> bytes:
    out = []
    while body:
        size_s, _, rest = body.partition(b"\r\n")
        size = int(size_s.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


def http_request(
    path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    """An HTTP/1.1 request (``Connection: close``) with ``body`` and a correct Content-Length."""
    hs = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close", **(headers or {})}
    hs.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
