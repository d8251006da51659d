"""vLLM KV events -> router hashes without I/O: chains continued through parent hashes, adapter salts, blocks
with an unknown parent skipped, removals mapped, both encodings of an event (array-like tagged, map)."""

from __future__ import annotations

import msgpack
from corral.router.backends.kv_events import HashTranslator, KvEventSubscriber, parse_event
from corral.router.hashing import block_hashes, salt_for


def test_stored_blocks_get_the_routers_hashes_through_parent_links() -> None:
    tokens = list(range(1000, 1000 + 64))  # 4 blocks of 16
    want = block_hashes(tokens, 16)
    tr = HashTranslator(16)
    assert tr.stored([b"v0", b"v1"], None, tokens[:32], None) == want[:2]
    assert tr.stored([b"v2", b"v3"], b"v1", tokens[32:64], None) == want[2:]  # continues from v1's hash
    lora = tr.stored([b"w0"], None, tokens[:16], "sql")
    assert lora == block_hashes(tokens[:16], 16, salt_for("sql")) and lora[0] != want[0]
    assert tr.stored([b"x9"], b"never-seen", tokens[:16], None) == [] and tr.skipped == 1
    assert tr.removed([b"v3", b"nope"]) == [want[3]]
    tr.clear()
    assert tr.stored([b"v4"], b"v2", tokens[48:64], None) == []


def test_event_encodings_and_a_batch() -> None:
    assert parse_event(["BlockRemoved", [1, 2], "GPU"]) == (
        "BlockRemoved",
        {"block_hashes": [1, 2], "medium": "GPU"},
    )
    kind, f = parse_event({"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None})
    assert kind == "BlockStored" and f["block_hashes"] == [7]
    assert parse_event(["AllBlocksCleared"]) == ("AllBlocksCleared", {})
    got: list[tuple[str, list[int]]] = []
    sub = KvEventSubscriber(
        "tcp://127.0.0.1:1",
        16,
        lambda hs: got.append(("stored", hs)),
        lambda hs: got.append(("removed", hs)),
        lambda: got.append(("cleared", [])),
    )
    tokens = list(range(32))
    stored = ["BlockStored", [11, 12], None, tokens, 16, None, "GPU", None]
    batch = [1.0, [stored, ["BlockRemoved", [12], "GPU"], ["AllBlocksCleared"]], 0]
    sub.handle(msgpack.packb(batch))
    h = block_hashes(tokens, 16)
    assert got == [("stored", h), ("removed", [h[1]]), ("cleared", [])]
    # another block size than the router's: ignored, not mis-hashed
    sub.handle(msgpack.packb([2.0, [["BlockStored", [13], None, tokens, 32, None, "GPU", None]], 0]))
    assert len(got) == 3
