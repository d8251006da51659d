"""The Corral operator as a test subprocess, and the helpers the operator tests share."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """``corral operator run`` as a subprocess of the test (started, restarted and stopped by pid)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.cmd, self.env, self.log, self.port = cmd, env, log, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: Any) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

        def live() -> bool:
            self.assert_alive()
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)

        wait(live, timeout=60, what="corral operator liveness")

    @contextlib.contextmanager
    def running(self, wait: Any, tail_lines: int = 100) -> Iterator[Operator]:
        """Started (ready when its liveness answers); on exit its log tail goes to stderr and it stops."""
        try:
            self.start(wait)
            yield self
        finally:
            if self.log.exists():
                sys.stderr.write(f"\n[corral operator] log tail ({self.log}):\n{self.tail(tail_lines)}\n")
            self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"corral operator exited {self.proc and self.proc.returncode}:\n{self.tail()}"
        )


def examples(ns: str) -> list[dict[str, Any]]:
    docs = []
    for f in sorted((REPO / "manifests" / "examples").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                d["metadata"]["namespace"] = ns
                docs.append(d)
    return docs
