"""``--workers N``: N router worker processes sharing the gRPC and HTTP ports (SO_REUSEPORT).

The kernel spreads incoming connections over the workers' listening sockets. Each worker is a complete,
independent router (``python -m corral.router.server`` with the same arguments): it subscribes to every
engine's event stream and rebuilds its own fleet state (prefix index, adapters, load), exactly like the
active-active routers of a deployment, so a prompt prefix goes to the replica that holds it whichever
worker takes the connection. This parent process only reserves the ports, starts the workers, restarts
one that dies and stops them on SIGINT/SIGTERM.

Ports given as 0 are picked here (a bound, never listening SO_REUSEPORT socket keeps them reserved), so
that all workers listen on the same ones. Per-worker state that is not rebuilt from the engines stays per
worker: ``/metrics`` and Explain records describe the worker that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time

from ..signals import stop_on_signals

_READY = re.compile(r"corral router: grpc (\S+)\s+http (\S+)")
RESTART_MIN_INTERVAL_S = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket on ``host:port`` (0 = a free port): the workers bind the
    same port with SO_REUSEPORT; anyone else gets 'address in use'. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, even by SIGKILL (no orphans)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_argv(argv: list[str], grpc_port: int, http_port: int) -> list[str]:
    """The command line of one worker: the parent's arguments with the reserved ports, as a worker."""
    return [sys.executable, "-m", "corral.router.server", *argv, "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), "--workers", "1", "--reuse-port"]  # fmt: skip


async def _start_worker(cmd: list[str], timeout_s: float) -> tuple[asyncio.subprocess.Process, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    raise OSError(f"router worker exited with code {await proc.wait()} before serving")
                m = _READY.search(line)
                if m:
                    return proc, m.group(1), m.group(2)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise


async def _stop(procs: list[asyncio.subprocess.Process], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


async def run_workers(argv: list[str], n: int, host: str, grpc_port: int, http_port: int, policy: str) -> int:
    """Run ``n`` workers on shared ports until SIGINT/SIGTERM; returns the exit code."""
    try:
        reserved = [reserve_port(host, grpc_port), reserve_port(host, http_port)]
    except OSError as e:
        print(
            f"corral router: cannot listen on {host} (gRPC port {grpc_port}, HTTP port {http_port}): "
            f"{e.strerror or e}; pick free ports with --grpc-port/--http-port (0 = any)",
            file=sys.stderr,
        )
        return 2
    gport, hport = (s.getsockname()[1] for s in reserved)
    cmd = worker_argv(argv, gport, hport)
    procs: list[asyncio.subprocess.Process] = []
    try:
        try:
            for _ in range(n):
                p, grpc_addr, http_url = await _start_worker(cmd, 60.0)
                procs.append(p)
        except OSError as e:
            print(f"corral router: {e}", file=sys.stderr)
            return 2
        pids = ",".join(str(p.pid) for p in procs)
        print(f"corral router: grpc {grpc_addr}  http {http_url}  policy {policy}  workers {n} (pids {pids})",
              flush=True)  # fmt: skip
        stop = stop_on_signals()
        last_restart = 0.0
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(procs)}
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for f in (stopper, *waits):
                if f not in done:
                    f.cancel()
            if stop.is_set():
                break
            if any(procs[waits[f]].returncode in (0, -signal.SIGINT, -signal.SIGTERM) for f in done):
                # a worker stopped by a signal (Ctrl-C reaches the whole process group): if this process is
                # stopping too, its own signal arrives at once; else the worker was stopped alone: restart
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                if stop.is_set():
                    break
            for f in done:
                i = waits[f]
                why = f"worker {procs[i].pid} exited with code {procs[i].returncode}"
                print(f"corral router: {why}: restarting", file=sys.stderr, flush=True)
                await asyncio.sleep(max(0.0, last_restart + RESTART_MIN_INTERVAL_S - time.monotonic()))
                last_restart = time.monotonic()
                try:
                    procs[i] = (await _start_worker(cmd, 60.0))[0]
                except OSError as e:
                    print(f"corral router: restarting a worker failed: {e}", file=sys.stderr, flush=True)
        return 0
    finally:
        await _stop(procs)
        for s in reserved:
            s.close()
