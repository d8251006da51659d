"""e2e/kind/run.sh cannot run here (no Docker): it is syntax-checked (``bash -n``), shellchecked when
shellcheck is installed, and dry-run: the steps come in order and its ``helm install`` values pass the
chart's schema."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import chart_testkit
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "e2e" / "kind" / "run.sh"


def dry_run() -> str:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=30, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bash_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_dry_run_lists_the_steps_in_order() -> None:
    out = dry_run()
    expected = [
        "+ kind create cluster --name corral",
        "+ docker build -f images/operator.Dockerfile -t corral-operator:dev .",
        "+ docker build -f images/ray.Dockerfile",
        "+ kind load docker-image corral-operator:dev corral-ray:dev --name corral",
        "+ helm --kube-context kind-corral install kuberay-operator kuberay/kuberay-operator --version 1.5.0",
        "+ helm --kube-context kind-corral install corral charts/corral",
        "+ corral_doctor",
        "+ kubectl --context kind-corral apply -f manifests/examples/",
        "+ kubectl --context kind-corral wait --for=condition=Ready modelpool/llama-8b",
        "+ helm --kube-context kind-corral test corral",
        "+ check_models",
        "+ check_completion",
        "+ helm --kube-context kind-corral uninstall corral",
    ]
    pos = -1
    for line in expected:
        found = out.find(line, pos + 1)
        assert found > pos, f"missing or out of order: {line}\n{out}"
        pos = found
    assert out.rstrip().endswith("kind e2e: OK")
    for dockerfile in re.findall(r"docker build -f (\S+)", out):
        assert (REPO / dockerfile).is_file()


def test_dry_run_helm_values_pass_the_chart_schema() -> None:
    line = next(ln for ln in dry_run().splitlines() if ln.startswith("+ helm") and " install corral " in ln)
    argv = shlex.split(line[2:])
    sets = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--set"]
    assert "operator.image.pullPolicy=Never" in sets
    args = [x for s in sets for x in ("--set", s)]
    objs = chart_testkit.template(*args)
    dep = next(o for o in objs if o["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "corral-operator:dev"
    assert "--image=corral-ray:dev" in container["args"]
