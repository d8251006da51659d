"""Tenant API key files (router/corral/router/server/auth.py): digests only, errors naming the line, live
reload (and a bad reload keeping the old keys), roles, tenant -> models, private adapters, `corral keys`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from corral.router.server.auth import (
    KeyFileError,
    KeyStore,
    Principal,
    append_key,
    check_model_access,
    hash_key,
    load_key_file,
    parse_key_file,
    visible,
)
from corral.router.server.errors import Forbidden, NotFound

A, B, OPS = "sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-ops-0003"

GOOD = f"""\
keys:
  - tenant: tenant-a
    key: {hash_key(A)}
  - tenant: tenant-b
    key: {hash_key(B)}
    role: inference
  - tenant: ops
    key: {hash_key(OPS)}
    role: admin
tenants:
  tenant-b:
    models: [llama-8b, "sql-*"]
"""


def test_digest_format_and_lookup() -> None:
    d = hash_key(A)
    assert d.startswith("sha256:") and len(d) == 7 + 64 and A not in d
    t = parse_key_file(GOOD)
    assert t.lookup(A) == Principal("tenant-a")
    assert t.lookup(OPS) == Principal("ops", "admin") and t.lookup(OPS).admin  # type: ignore[union-attr]
    assert t.lookup("sk-nope") is None and t.lookup(hash_key(A)) is None  # a digest is not a key
    assert t.allows("tenant-a", "anything") and t.allows("tenant-b", "sql-coder")
    assert not t.allows("tenant-b", "chat-lora")
    # the short form: digest -> tenant
    short = parse_key_file(f"{hash_key(A)}: tenant-a\n")
    assert short.lookup(A) == Principal("tenant-a")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("keys:\n  - tenant: a\n    key: sk-plain-secret-key\n", 3, "not a key digest"),
        (
            f"keys:\n  - tenant: a\n    key: {hash_key(A)}\n    role: root\n",
            4,
            "must be one of inference, admin",
        ),
        (f"keys:\n  - tenant: a\n    key: {hash_key(A)}\n    roel: admin\n", 4, "unknown field 'roel'"),
        (f"keys:\n  - key: {hash_key(A)}\n", 2, "missing field 'tenant'"),
        (
            f"keys:\n  - tenant: a\n    key: {hash_key(A)}\n  - tenant: b\n    key: {hash_key(A)}\n",
            5,
            "twice",
        ),
        ("keys:\n  - tenant: a\n    key: [x\n", 4, ""),  # YAML syntax error: its line
        ("keys: 3\n", 1, "expected a list"),
        (f"keys:\n  - tenant: 'bad tenant'\n    key: {hash_key(A)}\n", 2, "tenant name"),
        ("keys: []\ntenants:\n  a:\n    models: llama\n", 4, "expected a list of names"),
        ("", 1, "empty key file"),
        ("sk-plain-secret-key: tenant-a\n", 1, "not a key digest"),
    ],
)
def test_malformed_files_name_the_line_and_never_echo_a_key(text: str, line: int, words: str) -> None:
    with pytest.raises(KeyFileError) as ei:
        parse_key_file(text, "keys.yaml")
    msg = str(ei.value)
    assert msg.startswith(f"keys.yaml:{line}:"), msg
    assert words in msg
    assert "sk-plain-secret-key" not in msg


def test_store_reloads_when_the_file_changes_and_keeps_old_keys_on_a_bad_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(f"{hash_key(A)}: tenant-a\n")
    store = KeyStore.from_file(f, poll_s=0.0, background=False)  # reloads inline: deterministic here
    assert store.lookup(A) == Principal("tenant-a") and store.lookup(B) is None
    # add B, revoke A (a new inode, as a Kubernetes Secret update swaps the file)
    tmp = tmp_path / "new.yaml"
    tmp.write_text(f"{hash_key(B)}: tenant-b\n")
    os.replace(tmp, f)
    assert store.lookup(B) == Principal("tenant-b") and store.lookup(A) is None
    assert store.reloads == 1
    # a malformed version: logged with its line, the previous keys stay
    f.write_text("keys:\n  - tenant: a\n    key: sk-oops-plain\n")
    assert store.lookup(B) == Principal("tenant-b")
    assert store.last_error is not None and ":3:" in store.last_error
    assert any(":3:" in r.getMessage() for r in caplog.records)
    assert "sk-oops-plain" not in caplog.text
    # a missing file (mid-swap): the previous keys stay
    f.unlink()
    assert store.lookup(B) == Principal("tenant-b")
    f.write_text(GOOD)
    assert store.lookup(OPS) == Principal("ops", "admin") and store.lookup(B) == Principal("tenant-b")


def test_store_reloads_in_a_thread_keeping_the_old_keys_meanwhile(tmp_path: Path) -> None:
    import threading
    import time

    f = tmp_path / "keys.yaml"
    f.write_text(f"{hash_key(A)}: tenant-a\n")
    store = KeyStore.from_file(f, poll_s=0.0)  # the default: parse off the request path
    gate = threading.Event()
    real_load = store._load

    def slow_load(sig: tuple[int, int, int]) -> bool:
        gate.wait(10)  # a big file still being parsed
        return real_load(sig)

    store._load = slow_load  # type: ignore[method-assign]
    f.write_text(f"{hash_key(B)}: tenant-b\n")
    assert store.lookup(A) == Principal("tenant-a")  # starts the reload, answers with the keys in force
    assert store.lookup(B) is None and store.lookup(A) == Principal("tenant-a")
    gate.set()
    deadline = time.monotonic() + 10
    while store.lookup(B) is None:
        assert time.monotonic() < deadline, "the background reload never took effect"
        time.sleep(0.01)
    assert store.lookup(A) is None and store.reloads == 1


def test_store_polls_at_most_every_poll_s(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    f.write_text(f"{hash_key(A)}: tenant-a\n")
    store = KeyStore.from_file(f, poll_s=3600.0)
    f.write_text(f"{hash_key(B)}: tenant-b\n")
    assert store.lookup(B) is None  # not re-read yet
    assert store.maybe_reload(force=True) and store.lookup(B) == Principal("tenant-b")


def test_model_access_and_private_adapters() -> None:
    store = KeyStore(parse_key_file(GOOD))
    owners = {"acme-private": "tenant-a"}
    check_model_access(store, owners, "tenant-a", "acme-private", "acme-private")
    with pytest.raises(NotFound, match="model 'acme-private' not found"):
        check_model_access(store, owners, "ops", "acme-private", "acme-private")
    with pytest.raises(Forbidden, match=r"tenant 'tenant-b' may not use model 'chat-lora'.*llama-8b, sql-\*"):
        check_model_access(store, owners, "tenant-b", "chat-lora", "chat-lora")
    check_model_access(store, owners, "tenant-b", "sql-coder", "sql-coder")
    with pytest.raises(Forbidden, match=r"private to a tenant .* no API keys"):
        check_model_access(None, owners, None, "acme-private", "acme-private")
    check_model_access(None, owners, None, "llama-8b", None)
    assert visible(store, owners, "tenant-a", "acme-private")
    assert not visible(store, owners, "tenant-b", "acme-private") and not visible(
        None, owners, None, "acme-private"
    )
    assert not visible(store, owners, "tenant-b", "chat-lora") and visible(
        store, owners, "tenant-b", "llama-8b"
    )


def test_append_key_and_the_cli(tmp_path: Path) -> None:
    f = tmp_path / "keys.yaml"
    k1 = append_key(f, "tenant-a")
    k2 = append_key(f, "ops", "admin")
    text = f.read_text()
    assert k1 not in text and k2 not in text and hash_key(k1) in text
    t = load_key_file(f)
    assert t.lookup(k1) == Principal("tenant-a") and t.lookup(k2) == Principal("ops", "admin")
    cli = [sys.executable, "-m", "corral.api.cli", "keys"]
    out = subprocess.run(
        [*cli, "add", str(f), "--tenant", "tenant-b"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    k3 = out.stdout.strip()
    assert load_key_file(f).lookup(k3) == Principal("tenant-b") and k3 not in f.read_text()
    out = subprocess.run([*cli, "hash"], input=k3 + "\n", capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == hash_key(k3)
    out = subprocess.run([*cli, "check", str(f)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "3 keys, 3 tenants" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys:\n  - tenant: a\n    key: sk-plain\n")
    out = subprocess.run([*cli, "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"{bad}:3:" in out.stderr and "sk-plain" not in out.stderr
    with pytest.raises(KeyFileError, match=":3:"):
        append_key(bad, "a")  # a malformed file is never rewritten


def test_store_follows_a_kubernetes_secret_volume_update(tmp_path: Path) -> None:
    """A Secret volume: ``api-keys -> ..data/api-keys``, ``..data -> ..<timestamp>``; the kubelet writes a
    new timestamped folder and swaps ``..data`` atomically (the file's own path never changes)."""

    def version(name: str, text: str) -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "api-keys").write_text(text)
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(name)
        os.replace(tmp_link, tmp_path / "..data")  # rename(2) over the old link: atomic

    version("..2026_12_02_16_00_00.1", f"{hash_key(A)}: tenant-a\n")
    (tmp_path / "api-keys").symlink_to("..data/api-keys")
    store = KeyStore.from_file(tmp_path / "api-keys", poll_s=0.0, background=False)
    assert store.lookup(A) == Principal("tenant-a")
    version("..2026_12_02_16_05_00.2", f"{hash_key(B)}: tenant-b\n")
    assert store.lookup(B) == Principal("tenant-b") and store.lookup(A) is None
