"""Each file in tests/data/invalid/ has exactly one error, and `corral validate` reports it as its
`# expect:` header says; each file in tests/data/valid/ is accepted. tests/data/invalid-cross/ holds
objects that are valid one by one but wrong together (a RoutingPolicy pinning adapters its ModelPool lacks,
two policies for one pool): `corral validate` reports the one cross-object error. (The `# expect-server:`
header and the verdicts themselves are checked against a real kube-apiserver by
tests/integration/test_k8s_parity.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from corral.api.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"
FILES = sorted((DATA / "invalid").glob("*.yaml"))
CROSS = sorted((DATA / "invalid-cross").glob("*.yaml"))
VALID = sorted((DATA / "valid").glob("*.yaml"))


def headers(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        out[key.strip()] = value.strip()
    return out


def test_enough_cases() -> None:
    assert len(FILES) >= 40 and len(CROSS) >= 3 and len(VALID) >= 5


@pytest.mark.parametrize("path", FILES + CROSS, ids=[f"{f.parent.name}/{f.stem}" for f in FILES + CROSS])
def test_invalid_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = headers(path)
    assert head.get("expect"), f"{path.name}: missing '# expect:' header"
    assert head.get("expect-server"), f"{path.name}: missing '# expect-server:' header"
    if path in CROSS:
        assert head["expect-server"] == "-", "cross-object checks are offline-only (no webhook yet)"
    rc = main(["validate", "--quiet", str(path)])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.splitlines()
    assert len(lines) == 1, f"expected exactly one error, got:\n{out}"
    assert lines[0].startswith(f"{path}:")  # `file: ...` or `file:LINE: ...`
    assert head["expect"] in lines[0]
    assert "Traceback" not in out


@pytest.mark.parametrize("path", VALID, ids=[f.stem for f in VALID])
def test_valid_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("OK: ")


def test_whole_folders(capsys: pytest.CaptureFixture[str]) -> None:
    """One bad file (even one nested 2000 levels deep) never stops the others: one line per file."""
    assert main(["validate", "--quiet", str(DATA / "invalid")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(FILES)
    assert main(["validate", str(DATA / "valid")]) == 0
