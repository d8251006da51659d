"""Each file in tests/data/invalid/ has exactly one error, and `corral validate` reports it as its
`# expect:` header says. (The `# expect-server:` header is checked against a real kube-apiserver by the
integration tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from corral.api.cli import main

INVALID = Path(__file__).resolve().parents[1] / "data" / "invalid"
FILES = sorted(INVALID.glob("*.yaml"))


def headers(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        out[key.strip()] = value.strip()
    return out


def test_enough_cases() -> None:
    assert len(FILES) >= 12


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_invalid_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = headers(path)
    assert head.get("expect"), f"{path.name}: missing '# expect:' header"
    assert head.get("expect-server"), f"{path.name}: missing '# expect-server:' header"
    rc = main(["validate", "--quiet", str(path)])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    assert len(lines) == 1, f"expected exactly one error, got:\n{out}"
    assert lines[0].startswith(f"{path}: ")
    assert head["expect"] in lines[0]
