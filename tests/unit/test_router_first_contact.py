"""First contact with ``corral router``, ``explain``, ``keys`` and the ``corral`` entry point: a wrong
argument is one line naming it and exit 2, before anything listens (issues a new user hit cold)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from corral.api.cli import main
from corral.api.commands import Command, commands, register, unregister
from corral.router.backends.cli import asks_precise


@pytest.mark.parametrize(
    "spec", ["ftp://10.0.0.5:8000", "H100=", "notaurl", "http://", "H100=gopher://h:1", "=http://h:1"]
)
def test_a_backend_that_can_never_work_is_refused_at_parsing(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["router", "--backend", spec])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "corral router" in err and repr(spec) in err


def test_an_unknown_gpu_class_is_refused_naming_it_and_the_known_profiles(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(["router", "--backend", "B200=http://127.0.0.1:9", "--http-port", "0", "--grpc-port", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown GPU class 'B200'" in err
    assert "H100" in err and "A100-80GB" in err and "L4" in err


def test_a_gpu_class_of_the_policys_pool_is_accepted(tmp_path: Path) -> None:
    import argparse

    from corral.router.backends.cli import check_gpu_classes, configure

    p = argparse.ArgumentParser()
    configure(p)
    ns = p.parse_args(["--backend", "B200=http://127.0.0.1:9", "--backend", "l4=127.0.0.1:10"])
    check_gpu_classes(ns, {"B200": object()})  # declared by the ModelPool: no error
    with pytest.raises(ValueError, match="B200"):
        check_gpu_classes(ns, {})


_POLICY = """\
apiVersion: corral.dev/v1alpha1
kind: RoutingPolicy
metadata: {{name: rp}}
spec:
  poolRef: pool
{extra}"""


def test_only_a_policy_that_asks_for_precise_is_warned_about(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(_POLICY.format(extra=""))
    precise = tmp_path / "precise.yaml"
    precise.write_text(_POLICY.format(extra="  prefixIndex: precise\n"))
    assert not asks_precise([str(plain)])
    assert asks_precise([str(precise)])


def test_validate_unknown_option_shows_validates_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["validate", "--strict", "manifests/crds"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: corral validate" in err and "--strict" in err


def test_a_missing_extra_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = tmp_path / "corral_fc_lazy.py"  # a command whose run() imports its extra's module lazily
    mod.write_text(
        "def add_parser(sub):\n"
        "    p = sub.add_parser('fc-lazy')\n"
        "    p.set_defaults(func=run)\n"
        "    return p\n"
        "def run(args):\n"
        "    import corral_fc_not_installed_dep  # noqa: F401\n"
        "    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register(Command("fc-lazy", "corral_fc_lazy", "test", "fancy"))
    try:
        assert main(["fc-lazy"]) == 2
    finally:
        unregister("fc-lazy")
    err = capsys.readouterr().err
    assert "corral fc-lazy needs the 'fancy' extra: pip install 'corral[fancy]'" in err
    assert "Traceback" not in err


def test_keys_help_is_plain_text_with_the_file_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out and "::" not in out
    assert "sha256:" in out and "tenant:" in out and "role:" in out


def test_explain_refuses_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--router", "http://127.0.0.1:8000", "--request-id", "x"]) == 2
    err = capsys.readouterr().err
    assert "gRPC address HOST:PORT" in err and "not a URL" in err


@pytest.fixture
def http_port() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_explain_at_an_http_port_says_so(http_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["explain", "--router", f"127.0.0.1:{http_port}", "--request-id", "x", "--timeout", "10"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "looks like an HTTP port" in err and "gRPC" in err


def test_helptext_plain_removes_rest_markup() -> None:
    from corral.api.helptext import plain

    text = "``corral x``: see :mod:`corral.router.server.auth` and :class:`~a.B`::\n\n::\n\n    code\n"
    assert plain(text) == "corral x: see auth and B:\n\n\n    code"


@pytest.mark.parametrize("name", [c.name for c in commands()])
def test_no_command_help_shows_raw_rest(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.suppress(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:`" not in out and ":class:`" not in out, out
