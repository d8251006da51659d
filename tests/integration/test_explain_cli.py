"""`corral explain` against a real router + sim engines on loopback: the dry run prints cost terms, an
unknown request id gives a clear error naming it."""

from __future__ import annotations

import pytest
from corral.api.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router_addr():
    import asyncio
    import threading

    from corral.router.server import RouterConfig, RouterServer
    from corral.serve.endpoint import EchoEngine, EngineEndpoint

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, object] = {}

    async def up() -> None:
        eps = [await EngineEndpoint.start(EchoEngine(replica_id=f"e{i}"), "127.0.0.1", 0) for i in range(2)]
        srv = RouterServer([e.address for e in eps], RouterConfig(policy="corral"))
        await srv.start("127.0.0.1")
        await srv.wait_for_replicas(2)
        box.update(eps=eps, srv=srv)
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(up()), loop.run_forever()), daemon=True)
    t.start()
    assert ready.wait(30), "router did not come up"
    yield box["srv"].grpc_address  # type: ignore[attr-defined]

    async def down() -> None:
        await box["srv"].stop()  # type: ignore[attr-defined]
        for e in box["eps"]:  # type: ignore[attr-defined]
            await e.stop()

    asyncio.run_coroutine_threadsafe(down(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


def test_explain_dry_run_prints_candidates(router_addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = "echo"
    rc = main(["explain", "--router", router_addr, "--model", model, "--prompt", "hello " * 100])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "dry run" in out.out and "reason:" in out.out
    assert "queue_ms" in out.out and "prefill_ms" in out.out


def test_explain_unknown_request_id(router_addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["explain", "--router", router_addr, "--request-id", "no-such-request"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "NOT_FOUND" in err and "no-such-request" in err
