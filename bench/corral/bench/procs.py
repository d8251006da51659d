"""Real processes on loopback for fault tests and recovery benchmarks: sim engine replicas
(``python -m corral.serve.endpoint``) and standalone routers (``python -m corral.router.server``), each its
own OS process that can be killed (SIGKILL), stalled (SIGSTOP / SIGCONT) or restarted.

Each process prints one line once it serves; :func:`spawn` waits for it (bounded) and parses the
addresses from it. Output beyond that line goes to a log file whose tail is shown when a process fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_ENGINE_LINE = re.compile(r"corral engine: (\S+) grpc (\S+)")
_ROUTER_LINE = re.compile(r"corral router: grpc (\S+)\s+http (\S+)")


@dataclass
class Proc:
    """One child process started by :func:`spawn`."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[str]
    log_path: Path
    match: re.Match[str]
    started_s: float = 0.0  # seconds from spawn to its ready line
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (no cleanup, as a crashed node or an OOM kill) and reap it."""
        if self.stopped:
            self.cont()
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout=10)

    def stall(self) -> None:
        """SIGSTOP: alive (its sockets stay open) but silent."""
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if not self.alive():
            return
        if self.stopped:
            self.cont()
        self.popen.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def spawn(
    name: str, argv: list[str], ready: re.Pattern[str], timeout: float = 60.0, log_dir: Path | None = None
) -> Proc:
    """Start ``argv`` and wait (at most ``timeout`` s) for a stdout line matching ``ready``."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="corral-procs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    logf = open(log_path, "a")  # noqa: SIM115 - the child writes to it for its whole life
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=logf, text=True, env=env, start_new_session=True
    )
    logf.close()
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    seen: list[str] = []
    try:
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0 or p.poll() is not None:
                break
            if not sel.select(min(left, 0.5)):
                continue
            line = p.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            m = ready.search(line)
            if m:
                proc = Proc(name, argv, p, log_path, m, time.monotonic() - t0)
                _drain(p, log_path)
                return proc
    finally:
        sel.close()
    with contextlib.suppress(ProcessLookupError):
        p.kill()
    p.wait(timeout=10)
    tail = log_path.read_text(errors="replace")[-3000:]
    why = f"exited with {p.returncode}" if p.returncode is not None else f"not ready after {timeout:.0f}s"
    raise RuntimeError(f"{name} ({' '.join(argv)}) {why}; stdout: {seen[-5:]}; log:\n{tail}")


def _drain(p: subprocess.Popen[str], log_path: Path) -> None:
    """Copy the rest of the child's stdout into its log on a daemon thread (a full pipe would block it)."""
    import threading

    def pump() -> None:
        assert p.stdout is not None
        with open(log_path, "a") as f:
            for line in p.stdout:
                f.write(line)
                f.flush()

    threading.Thread(target=pump, name=f"corral-drain-{p.pid}", daemon=True).start()


@dataclass
class EngineProc:
    """A sim engine replica in its own process."""

    proc: Proc
    replica_id: str
    address: str


@dataclass
class RouterProc:
    """A standalone router in its own process."""

    proc: Proc
    grpc_address: str
    http_url: str


def start_engine(
    replica_id: str,
    model: str,
    *,
    profile: str = "H100",
    time_scale: float = 20.0,
    max_model_len: int = 8192,
    sample_period_s: float = 0.05,
    adapter_cache: Path | None = None,
    port: int = 0,
    log_dir: Path | None = None,
    timeout: float = 60.0,
) -> EngineProc:
    argv = [sys.executable, "-m", "corral.serve.endpoint", "--model", model, "--replica-id", replica_id,
            "--profile", profile, "--time-scale", str(time_scale), "--max-model-len", str(max_model_len),
            "--sample-period", str(sample_period_s), "--port", str(port)]  # fmt: skip
    if adapter_cache is not None:
        argv += ["--adapter-cache", str(adapter_cache)]
    p = spawn(f"engine-{replica_id}", argv, _ENGINE_LINE, timeout, log_dir)
    return EngineProc(p, p.match.group(1), p.match.group(2))


def start_router(
    engines: list[str],
    *,
    name: str = "router",
    stale_after_s: float = 0.5,
    policy: str | None = None,
    extra: list[str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 60.0,
) -> RouterProc:
    argv = [sys.executable, "-m", "corral.router.server", "--engines", ",".join(engines),
            "--grpc-port", "0", "--http-port", "0", "--stale-after", str(stale_after_s),
            "--log-level", "WARNING"]  # fmt: skip
    if policy:
        argv += ["--policy", policy]
    argv += extra or []
    p = spawn(name, argv, _ROUTER_LINE, timeout, log_dir)
    return RouterProc(p, p.match.group(1), p.match.group(2))
