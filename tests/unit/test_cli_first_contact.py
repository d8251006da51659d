"""First contact with the CLI: one clear line for what a user can fix, stdout for `corral crds`, nothing
advertised that does not exist, and `corral bench overhead` running end to end as a subprocess."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from corral.api import crdgen
from corral.api.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "manifests" / "examples"


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"corral {argv[0]}: ")
    return lines[0]


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_bad_input_is_one_line_not_a_traceback(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line_error(capsys, [command, "-f", str(tmp_path / "missing")])
    assert "missing: no such file or directory" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(capsys, [command, "-f", str(empty)])
    assert "no YAML files found" in line or "no ModelPool found" in line
    only_policy = tmp_path / "only-policy"
    only_policy.mkdir()
    shutil.copy(EXAMPLES / "routingpolicy.yaml", only_policy)
    assert "no ModelPool found" in _one_line_error(capsys, [command, "-f", str(only_policy)])

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("apiVersion: corral.dev/v1alpha1\nkind: ModelPool\nspec: [unclosed\n")
    assert "YAML syntax error" in _one_line_error(capsys, [command, "-f", str(bad_yaml)])

    pool = yaml.safe_load((EXAMPLES / "modelpool.yaml").read_text())
    pool["spec"]["gpuClasses"][0]["maxReplicas"] = -1
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(pool))
    line = _one_line_error(capsys, [command, "-f", str(invalid)])
    assert "spec.gpuClasses[0]" in line


def test_folders_are_read_as_validate_reads_them(tmp_path: Path) -> None:
    """Nested folders and .yml files count; a foreign object is refused as `corral validate` does."""
    from corral.serve.manifests import ManifestError, load_manifests

    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(EXAMPLES / "modelpool.yaml", nested / "pool.yml")
    shutil.copy(EXAMPLES / "routingpolicy.yaml", tmp_path / "policy.yaml")
    ((pool, policy),) = load_manifests([tmp_path])
    assert policy is not None and policy["spec"]["poolRef"] == pool["metadata"]["name"]
    (tmp_path / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    with pytest.raises(ManifestError, match="apiVersion"):
        load_manifests([tmp_path])


def test_port_in_use_is_reported_before_ray_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_error(capsys, ["serve", "-f", str(EXAMPLES), "--http-port", str(port)])
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_deployment_failure_names_the_cause() -> None:
    from corral.serve.local_stack import failure_cause

    msg = (
        "Deploying app 'p' failed with exception:\nTraceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise OSError(98)\n'
        "ray.exceptions.RayTaskError(OSError): boom\nOSError: [Errno 98] Address already in use\n"
    )
    assert failure_cause(msg) == "OSError: [Errno 98] Address already in use"
    assert failure_cause("just a message") == "just a message"


def test_crds_print_to_stdout_and_write_only_with_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["crds"]) == 0
    out = capsys.readouterr().out
    docs = list(yaml.safe_load_all(out))
    names = sorted(d["metadata"]["name"] for d in docs)
    assert names == ["modelpools.corral.dev", "routingpolicies.corral.dev"]
    assert not list(tmp_path.iterdir())  # nothing written
    assert main(["crds", "--out", "crds"]) == 0
    assert sorted(p.name for p in (tmp_path / "crds").iterdir()) == sorted(crdgen.render_all())
    monkeypatch.chdir(REPO)
    assert main(["crds", "--check"]) == 0  # default --check compares with manifests/crds


def test_operator_is_advertised(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "operator" in capsys.readouterr().out
    assert main(["operator"]) == 2  # no subcommand: usage
    assert "run" in capsys.readouterr().err


def test_bench_overhead_runs_as_a_subprocess_and_writes_to_out(tmp_path: Path) -> None:
    """Used to crash in spawned workers (``No module named 'corral_bench_overhead'``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "corral.api.cli", "bench", "overhead", "--duration", "0.3", "--warmup", "0.1",
         "--concurrency", "2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "router_overhead.json").read_text())
    assert {r["case"] for r in doc["results"]} >= {"direct_grpc", "router_grpc", "router_http"}
    assert all(r["errors"] == 0 for r in doc["results"])
    assert not (tmp_path / "corral-bench").exists()


def test_bench_default_out_is_the_current_directory() -> None:
    from corral.bench import DEFAULT_OUT, fleet, router_micro, router_overhead

    assert Path("corral-bench") == DEFAULT_OUT and not DEFAULT_OUT.is_absolute()
    for mod in (fleet, router_micro):
        assert mod.DEFAULT_OUT == DEFAULT_OUT
    assert "docs" not in router_overhead.__doc__.split("Writes")[1].split("\n")[0]


def test_demo_with_api_keys_needs_a_key_to_send(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A demo whose router requires keys would send every request without one (all 401): refused up front."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("")
    line = _one_line_error(capsys, ["demo", "-f", str(EXAMPLES), "--api-keys", str(keys)])
    assert "--demo-key KEY" in line and "corral keys add" in line
