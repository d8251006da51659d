"""`corral` CLI: validate (files, dirs, multi-doc, stdin, errors), crds --check, version, registry."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from corral.api import crdgen
from corral.api.cli import main
from corral.api.commands import Command, commands, register, unregister

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"

POOL = """\
apiVersion: corral.dev/v1alpha1
kind: ModelPool
metadata: {name: p}
spec:
  models: [{name: m, baseModel: org/m}]
  gpuClasses: [{name: g, maxReplicas: 1}]
"""
POLICY = """\
apiVersion: corral.dev/v1alpha1
kind: RoutingPolicy
metadata: {name: r}
spec: {poolRef: p}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_validate_examples_ok(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "validate", str(EXAMPLES))
    assert rc == 0
    assert out.startswith("OK: 2 object(s) in 2 file(s)")
    assert "not checked against" not in out


def test_validate_policy_alone_says_pool_checks_were_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "validate", str(EXAMPLES / "routingpolicy.yaml"))
    assert rc == 0 and out.startswith("OK: 1 object(s)")
    assert "not checked against their pools" in out and "validate the policy together with its pool" in out


def test_validate_multi_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "all.yaml"
    f.write_text(f"---\n{POOL}---\n---\n{POLICY}")
    rc, out, _ = run(capsys, "validate", str(f))
    assert rc == 0, out
    assert "ModelPool 1, RoutingPolicy 1" in out


def test_validate_reports_every_error_with_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.yaml"
    bad = POOL.replace("{name: g, maxReplicas: 1}", "{name: g, minReplicas: 2, maxReplicas: 1}")
    bad = bad.replace("baseModel: org/m}", "baseModel: org/m, engin: vllm}")
    f.write_text(bad + "---\n" + POLICY.replace("{poolRef: p}", "{poolRef: p, blockSize: 7}"))
    rc, out, _ = run(capsys, "validate", str(f))
    assert rc == 1
    assert f"{f}: ModelPool/p: spec.models[0].engin: unknown field" in out
    assert f"{f}: ModelPool/p: spec.gpuClasses[0].maxReplicas: must be >= minReplicas (got 1 < 2)" in out
    assert f"{f}: RoutingPolicy/r: spec.blockSize: Unsupported value: 7" in out


def test_validate_yaml_syntax_error_has_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text(POOL + "  adapters: [unclosed\n")
    rc, out, _ = run(capsys, "validate", str(f))
    assert rc == 1
    assert out.startswith(f"{f}:8: YAML syntax error")


def test_validate_unknown_kind_and_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(
        "apiVersion: corral.dev/v1alpha1\nkind: Pool\nmetadata: {name: a}\n---\n"
        + POLICY.replace("v1alpha1", "v2")
        + "---\n- just a list\n"
    )
    rc, out, _ = run(capsys, "validate", str(f))
    assert rc == 1
    assert 'Pool/a: kind: unknown kind "Pool" (expected ModelPool or RoutingPolicy)' in out
    assert 'RoutingPolicy/r: apiVersion: unknown apiVersion "corral.dev/v2"' in out
    assert "<document 3>: expected a mapping, got list" in out


def test_validate_foreign_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "with-secret.yaml"
    f.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\n---\n" + POLICY)
    rc, _, _ = run(capsys, "validate", str(f))
    assert rc == 1
    rc, out, _ = run(capsys, "validate", "--skip-foreign", str(f))
    assert rc == 0
    assert "1 foreign skipped" in out


def test_validate_missing_path_and_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "validate", "/nonexistent/corral.yaml")
    assert rc == 1
    assert "/nonexistent/corral.yaml: no such file or directory" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO(POOL))
    rc, out, _ = run(capsys, "validate", "-")
    assert rc == 0, out


def test_validate_empty_folder_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not yaml")
    rc, out, err = run(capsys, "validate", str(tmp_path))
    assert rc == 1
    assert out == f"no YAML files found in {tmp_path} (looked for *.yaml and *.yml)\n" and err == ""
    rc, out, err = run(capsys, "validate", str(tmp_path / "missing"))
    assert (rc, out, err) == (1, f"{tmp_path / 'missing'}: no such file or directory\n", "")


def test_validate_deep_nesting_does_not_stop_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = "[" * 3000 + "]" * 3000
    (tmp_path / "a-deep.yaml").write_text(POOL.replace("org/m}", f"org/m, engineArgs: {{x: {deep}}}}}"))
    (tmp_path / "b-ok.yaml").write_text(POLICY)
    (tmp_path / "c-bad.yaml").write_text(POLICY.replace("{poolRef: p}", "{poolRef: p, ttftSloMs: '5'}"))
    rc, out, err = run(capsys, "validate", str(tmp_path))
    assert rc == 1 and "Traceback" not in out + err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith(f"{tmp_path / 'a-deep.yaml'}:5: ModelPool/p: spec.models[0].engineArgs.x[0]")
    assert "nested deeper than 64 levels" in lines[0]
    assert (
        lines[1]
        == f'{tmp_path / "c-bad.yaml"}: RoutingPolicy/r: spec.ttftSloMs: must be of type number (got "5")'
    )


def test_validate_checks_pool_and_policy_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = POOL.replace(
        "gpuClasses:", "adapters: [{name: sql, baseModel: m, source: 'file:///a'}]\n  gpuClasses:"
    )
    (tmp_path / "pool.yaml").write_text(pool)
    (tmp_path / "rp.yaml").write_text(
        POLICY.replace("{poolRef: p}", "{poolRef: p, adapterPaging: {pin: [sql, x]}}")
    )
    rc, out, _ = run(capsys, "validate", str(tmp_path))
    assert rc == 1
    pin = 'spec.adapterPaging.pin[1]: must name an adapter of ModelPool "p" (got "x")'
    assert out == f"{tmp_path / 'rp.yaml'}: RoutingPolicy/r: {pin}\n"
    # the policy alone is fine (its pool is not there to check against); pool from a file + policy on stdin
    assert run(capsys, "validate", str(tmp_path / "rp.yaml"))[0] == 0
    second = POLICY.replace("name: r}", "name: r2}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(second))
    rc, out, _ = run(capsys, "validate", str(tmp_path / "pool.yaml"), "-")
    assert rc == 0, out
    monkeypatch.setattr(sys, "stdin", io.StringIO(second))
    rc, out, _ = run(capsys, "validate", str(tmp_path), "-")
    assert rc == 1
    assert '<stdin>: RoutingPolicy/r2: spec.poolRef: ModelPool "p" already has RoutingPolicy "r"' in out


def test_crds_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "crds", "--check", "--out", str(tmp_path))
    assert rc == 1
    assert "+++" in out
    assert run(capsys, "crds", "--out", str(tmp_path))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(crdgen.render_all())
    rc, out, _ = run(capsys, "crds", "--check", "--out", str(tmp_path))
    assert rc == 0, out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "version")
    assert rc == 0
    assert out.startswith("corral ") and "corral.dev/v1alpha1" in out


def test_help_lists_commands_and_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("validate", "crds", "version", "bench", "serve", "demo", "explain"):
        assert name in out
    assert main([]) == 2


def test_registry_lazy_and_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    register(Command("ghost", "corral.api.no_such_module", "Not installed.", extra="ghost"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(Command("ghost", "x", "y"))
        rc, _, err = run(capsys, "ghost")
        assert rc == 2
        assert "command 'ghost' is unavailable" in err and "corral[ghost]" in err
        assert "ghost" in [c.name for c in commands()]
    finally:
        unregister("ghost")


def test_console_script_subprocess_imports_no_ray() -> None:
    code = (
        "import sys; from corral.api.cli import main; rc = main(['validate', sys.argv[1]]);"
        "heavy = [m for m in ('ray', 'kopf', 'corral.serve', 'corral.router') if m in sys.modules];"
        "assert not heavy, heavy; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK: 2 object(s)" in proc.stdout
