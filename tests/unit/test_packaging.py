"""Packaging: the wheel carries every component (benchmarks and their data included) and works outside
the checkout; the router service imports without Ray; the extras keep Ray out of the router's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _source_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [f for f in out.splitlines() if (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built (no isolation, no deps) from a copy of the source tree, so the build hook's
    generated stubs never touch the checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _source_files():
        dest = src / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp / "dist").glob("corral-*.whl")
    return whl


def test_wheel_ships_the_benchmarks_with_their_data_and_no_namespace_init(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for mod in ("__init__", "fleet", "router_micro", "router_overhead"):
        assert f"corral/bench/{mod}.py" in names
    assert "corral/bench/data/conversation_trace_head.jsonl" in names
    assert "corral/bench/data/LICENSE-mooncake" in names
    for pkg in ("api", "router", "serve", "operator"):
        assert f"corral/{pkg}/__init__.py" in names
    assert "corral/serve/adapter_sources.py" in names
    assert "corral/router/paging/planning.py" in names and "corral/router/paging/executing.py" in names
    assert "corral/v1/corral_pb2.py" in names or any(n.startswith("corral/v1/") for n in names)
    assert "corral/__init__.py" not in names  # PEP 420 namespace package
    assert not any(n.startswith("operator/") for n in names)


def test_bench_runs_from_the_wheel_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Only the unpacked wheel provides ``corral`` (the checkout's source roots are taken off sys.path);
    ``corral bench overhead`` runs (its spawned workers import ``corral.bench`` by name) and writes to
    ./corral-bench/ in the current directory."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    code = textwrap.dedent(f"""
        import sys
        checkout = {[str(REPO / r) for r in ("", "api", "router", "serve", "operator", "bench")]!r}
        sys.path[:] = [p for p in sys.path if p.rstrip("/") not in checkout and p not in ("", ".")]
        sys.path.insert(0, {str(site)!r})
        import corral.bench, corral.bench.fleet as fleet
        assert corral.bench.__file__.startswith({str(site)!r}), corral.bench.__file__
        assert corral.bench.checkout_root() is None
        assert fleet.SAMPLE_TRACE.is_file() and fleet.default_trace().is_file()
        from corral.api.cli import main
        sys.exit(main(["bench", "overhead", "--duration", "0.3", "--warmup", "0.1", "--concurrency", "2"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / "corral-bench" / "router_overhead.json").is_file()
    assert (work / "corral-bench" / "router_overhead.md").is_file()


def test_router_extra_has_no_ray_and_serve_has_it() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "router" in extras
    assert not any(d.split("[")[0].strip().lower() == "ray" for d in extras["router"])
    for need in ("grpcio", "protobuf", "prometheus-client", "opentelemetry-api", "orjson", "aiohttp"):
        assert any(d.startswith(need) for d in extras["router"]), need
    assert any(d.startswith("ray[serve]") for d in extras["serve"])
    assert "corral[router]" in extras["serve"]


def test_router_service_imports_without_ray() -> None:
    code = textwrap.dedent("""
        import importlib.abc, sys

        class NoRay(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "kopf"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, NoRay())
        import corral.router.server, corral.router.paging, corral.router.explain_cli
        from corral.router.server import RouterConfig, RouterServer
        assert not [m for m in sys.modules if m.split(".")[0] == "ray"]
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_source_roots_are_listed_everywhere() -> None:
    roots = ["api", "router", "serve", "operator", "bench"]
    wheel_cfg = PYPROJECT["tool"]["hatch"]["build"]
    assert sorted(PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]) == sorted(
        f"{r}/corral" for r in roots
    )
    assert sorted(wheel_cfg["dev-mode-dirs"]) == sorted(roots)
    assert sorted(PYPROJECT["tool"]["mypy"]["mypy_path"]) == sorted(roots)
    for r in roots:
        assert not (REPO / r / "corral" / "__init__.py").exists()
    assert not (REPO / "operator" / "__init__.py").exists()
