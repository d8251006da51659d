"""Block hashing and request building: salt isolation, only full blocks, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from corral.router.hashing import block_hashes, salt_for, salted_ids
from corral.router.request import ByteTokenizer, build_request, request_from_block_ids
from router_testkit import prompt


def test_only_full_blocks_are_hashed() -> None:
    toks = prompt(0, 16 * 3 + 5)
    assert len(block_hashes(toks, 16)) == 3
    assert block_hashes(toks[:15], 16) == []


def test_chaining_makes_a_hash_stand_for_the_whole_prefix() -> None:
    a = prompt(1, 64)
    b = a.copy()
    b[0] += 1  # differs only in block 0
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert all(x != y for x, y in zip(ha, hb, strict=True))
    c = np.concatenate([a, prompt(2, 32)])
    assert block_hashes(c, 16)[:4] == ha  # shared prefix -> shared leading hashes


def test_deterministic_and_list_or_array_input() -> None:
    toks = prompt(3, 1000)
    assert block_hashes(toks, 16, "s") == block_hashes(list(map(int, toks)), 16, "s")


@pytest.mark.parametrize(
    ("s1", "s2"),
    [
        (salt_for("a"), salt_for("b")),
        (salt_for("a"), None),
        (salt_for(None, "t1"), salt_for(None, "t2")),
        (salt_for("a", "t"), salt_for("a")),
    ],
)
def test_salt_isolation(s1: str | None, s2: str | None) -> None:
    toks = prompt(4, 160)
    assert not set(block_hashes(toks, 16, s1)) & set(block_hashes(toks, 16, s2))
    assert not set(salted_ids(range(10), s1)) & set(salted_ids(range(10), s2))


def test_block_size_validation() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], 0)


def test_byte_tokenizer_is_deterministic_and_prefix_preserving() -> None:
    tok = ByteTokenizer()
    a = tok.encode("hello world, " * 20)
    b = tok.encode("hello world, " * 20 + "and more")
    assert list(a) == list(tok.encode("hello world, " * 20))
    assert list(b[: len(a) - 1]) == list(a[:-1])
    assert len(tok.encode("abcd")) == 1
    assert len(ByteTokenizer(1).encode("héllo")) == len("héllo".encode())


def test_build_request_salts_by_adapter_and_tenant() -> None:
    text = "You are a helpful assistant. " * 40
    base = build_request("1", "m", text=text)
    lora = build_request("2", "m", text=text, adapter="a")
    t1 = build_request("3", "m", text=text, tenant="t1")
    shared = build_request("4", "m", text=text, tenant="t1", isolate_tenant=False)
    assert base.block_hashes and base.prompt_tokens == len(text) // 4
    assert not set(base.block_hashes) & set(lora.block_hashes)
    assert not set(base.block_hashes) & set(t1.block_hashes)
    assert shared.block_hashes == base.block_hashes and shared.tenant == "t1"
    with pytest.raises(ValueError, match="exactly one"):
        build_request("5", "m")


def test_request_from_block_ids_matches_salted_ids() -> None:
    r = request_from_block_ids("x", "m", [0, 5, 9], 1500, adapter="a")
    assert r.block_hashes == salted_ids([0, 5, 9], salt_for("a"))
    assert r.prompt_tokens == 1500
