"""vLLM's KV-cache events (its ZMQ publisher) -> the router's precise prefix index for one backend.

vLLM started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557"}'`` publishes, on a ZMQ PUB socket, multipart messages ``(topic, seq: 8
bytes big-endian, payload)`` whose payload is the msgpack of ``KVEventBatch`` = ``[ts, events, dp_rank]``;
each event is a tagged ``msgspec`` struct, encoded array-like as ``["BlockStored", block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, ...]``, ``["BlockRemoved",
block_hashes, medium, ...]``, ``["AllBlocksCleared"]`` (a map with ``"type"`` is read too).

vLLM's block hashes (sha256 of pickled token tuples by default) are not the router's (xxh3 chains salted by
adapter, :mod:`corral.router.hashing`), so :class:`HashTranslator` recomputes the router's hash of every
stored block from the event's ``token_ids``, chained from the router hash of its ``parent_block_hash`` (or
from the adapter's root when it has none), and remembers vLLM hash -> router hash for the parents and
removals that follow. That needs the router to tokenize as the backend does (``--tokenizer``, the ModelPool's
``tokenizer``) and the same block size; a block whose parent was never seen (events missed before this
router subscribed) is skipped: the replay endpoint is not used.

Requires ``pyzmq`` and ``msgpack`` (``pip install 'corral[kv-events]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xxhash

from ..hashing import root_seed, salt_for

log = logging.getLogger(__name__)
_xxh = xxhash.xxh3_64_intdigest

MAX_MAPPED = 1 << 20  # vLLM hash -> router hash entries kept per backend (LRU)


class HashTranslator:
    """vLLM block hashes -> router block hashes for one backend (see the module docstring)."""

    def __init__(self, block_size: int, max_entries: int = MAX_MAPPED) -> None:
        self.block_size = block_size
        self.max_entries = max_entries
        self.map: OrderedDict[Any, int] = OrderedDict()
        self.skipped = 0  # stored blocks whose parent was unknown

    def stored(
        self, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int], lora_name: str | None
    ) -> list[int]:
        """Router hashes of the blocks of a ``BlockStored`` event (empty when its parent is unknown)."""
        bs = self.block_size
        if len(token_ids) < len(hashes) * bs:
            return []
        if parent is None:
            h = root_seed(salt_for(lora_name or None))
        else:
            got = self.map.get(parent)
            if got is None:
                self.skipped += len(hashes)
                return []
            h = got
        arr = np.asarray(token_ids[: len(hashes) * bs], dtype=np.uint32).tobytes()
        step = bs * 4
        out: list[int] = []
        m = self.map
        for i, vh in enumerate(hashes):
            h = _xxh(arr[i * step : (i + 1) * step], h)
            out.append(h)
            m[vh] = h
            m.move_to_end(vh)
        while len(m) > self.max_entries:
            m.popitem(last=False)
        return out

    def removed(self, hashes: Sequence[Any]) -> list[int]:
        return [h for vh in hashes if (h := self.map.pop(vh, None)) is not None]

    def clear(self) -> None:
        self.map.clear()


def parse_event(ev: Any) -> tuple[str, dict[str, Any]]:
    """One event, array-like (``[tag, fields...]``) or a map with ``type`` -> (type, fields)."""
    if isinstance(ev, dict):
        return str(ev.get("type", "")), ev
    if isinstance(ev, list | tuple) and ev:
        tag = ev[0].decode() if isinstance(ev[0], bytes) else str(ev[0])
        names: tuple[str, ...] = ()
        if tag == "BlockStored":
            names = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                     "lora_name")  # fmt: skip
        elif tag == "BlockRemoved":
            names = ("block_hashes", "medium")
        return tag, dict(zip(names, ev[1:], strict=False))
    return "", {}


class KvEventSubscriber:
    """Subscribes to one backend's publisher and calls ``on_stored(hashes)`` / ``on_removed(hashes)`` /
    ``on_cleared()`` with router block hashes. ``run()`` until cancelled."""

    def __init__(
        self,
        endpoint: str,
        block_size: int,
        on_stored: Callable[[list[int]], None],
        on_removed: Callable[[list[int]], None],
        on_cleared: Callable[[], None],
        topic: str = "",
    ) -> None:
        self.endpoint, self.topic = endpoint, topic
        self.translator = HashTranslator(block_size)
        self.on_stored, self.on_removed, self.on_cleared = on_stored, on_removed, on_cleared
        self.batches = 0
        self.last_seq = -1
        self.gaps = 0  # sequence numbers missed (PUB drops under back-pressure)
        self.connected = asyncio.Event()

    def handle(self, payload: bytes) -> None:
        import msgpack

        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        events = batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else []
        self.batches += 1
        tr = self.translator
        for ev in events:
            kind, f = parse_event(ev)
            if kind in ("BlockStored", "BlockRemoved") and str(f.get("medium") or "GPU").upper() == "CPU":
                continue  # vLLM's CPU offloading tier: not the GPU prefix cache this index mirrors
            if kind == "BlockStored":
                if f.get("block_size") not in (None, tr.block_size):
                    log.warning("%s: vLLM block size %s != the router's %s: KV events ignored",
                                self.endpoint, f.get("block_size"), tr.block_size)  # fmt: skip
                    continue
                hs = tr.stored(
                    f.get("block_hashes") or [], f.get("parent_block_hash"), f.get("token_ids") or [],
                    f.get("lora_name"),
                )  # fmt: skip
                if hs:
                    self.on_stored(hs)
            elif kind == "BlockRemoved":
                hs = tr.removed(f.get("block_hashes") or [])
                if hs:
                    self.on_removed(hs)
            elif kind == "AllBlocksCleared":
                tr.clear()
                self.on_cleared()

    async def run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sock.connect(self.endpoint)
        self.connected.set()
        try:
            while True:
                parts = await sock.recv_multipart()
                if len(parts) < 3:
                    continue
                seq = int.from_bytes(parts[1], "big", signed=True)
                if self.last_seq >= 0 and seq > self.last_seq + 1:
                    self.gaps += seq - self.last_seq - 1
                self.last_seq = seq
                try:
                    self.handle(parts[2])
                except Exception:  # a malformed batch must not stop the subscription
                    log.exception("%s: bad KV event batch", self.endpoint)
        finally:
            with contextlib.suppress(Exception):
                sock.close(0)
