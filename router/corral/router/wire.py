"""Conversions between the ``corral.v1`` protobuf messages and the router's own value types.

Shared by the engine endpoint (``corral.serve.endpoint``, which encodes) and the router's engine client
(:mod:`corral.router.engine_client`, which decodes), so both ends agree on one mapping of
:mod:`corral.router.events` onto ``EngineEvent`` messages; likewise the decision trace's candidate costs
(router ``Explain`` encodes, ``corral explain`` decodes). Replica ids are not on the wire per event: a
subscription belongs to one engine, whose id is in the snapshot's ``EngineInfo``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.v1 import engine_pb2 as epb
from corral.v1 import router_pb2 as rpb

from .events import (
    AdapterLoaded,
    AdapterUnloaded,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineEvent,
    LoadSample,
)
from .types import CandidateCost, Decision


@dataclass(slots=True)
class EngineInfo:
    """What an engine replica tells routers about itself (the snapshot's header)."""

    replica_id: str
    model: str
    gpu_class: str
    profile: str
    block_size: int = 16
    kv_capacity_blocks: int = 0
    max_loras: int = 4
    max_cpu_loras: int = 8
    max_model_len: int = 8192
    engine: str = "sim"
    sample_period_s: float = 0.1
    address: str = ""
    tokenizer: str = ""  # file://PATH or PATH of the engine's tokenizer; "" = the sim's
    stream_address: str = ""  # the engine's framed TCP stream (corral.router.engine_mux); "" = none
    extra: dict[str, Any] = field(default_factory=dict)

    def to_pb(self) -> epb.EngineInfo:
        return epb.EngineInfo(
            replica_id=self.replica_id,
            model=self.model,
            gpu_class=self.gpu_class,
            profile=self.profile,
            block_size=self.block_size,
            kv_capacity_blocks=self.kv_capacity_blocks,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_model_len=self.max_model_len,
            engine=self.engine,
            sample_period_s=self.sample_period_s,
            address=self.address,
            tokenizer=self.tokenizer,
            stream_address=self.stream_address,
        )

    @classmethod
    def from_pb(cls, m: epb.EngineInfo) -> EngineInfo:
        return cls(
            replica_id=m.replica_id,
            model=m.model,
            gpu_class=m.gpu_class,
            profile=m.profile,
            block_size=m.block_size or 16,
            kv_capacity_blocks=m.kv_capacity_blocks,
            max_loras=m.max_loras,
            max_cpu_loras=m.max_cpu_loras,
            max_model_len=m.max_model_len,
            engine=m.engine,
            sample_period_s=m.sample_period_s,
            address=m.address,
            tokenizer=m.tokenizer,
            stream_address=m.stream_address,
        )


def sample_to_pb(s: LoadSample) -> epb.LoadSample:
    return epb.LoadSample(
        time=s.time,
        running=s.running,
        waiting=s.waiting,
        waiting_prefill_tokens=s.waiting_prefill_tokens,
        running_tokens=s.running_tokens,
        kv_usage=s.kv_usage,
    )


def event_to_pb(ev: EngineEvent, sources: dict[str, str] | None = None) -> epb.EngineEvent:
    """One engine event as a wire message (``sources``: adapter name -> source URI, optional)."""
    if isinstance(ev, BlockStored):
        medium = "" if ev.medium == "gpu" else ev.medium
        return epb.EngineEvent(stored=epb.BlocksStored(block_hashes=ev.block_hashes, medium=medium))
    if isinstance(ev, BlockRemoved):
        medium = "" if ev.medium == "gpu" else ev.medium
        return epb.EngineEvent(removed=epb.BlocksRemoved(block_hashes=ev.block_hashes, medium=medium))
    if isinstance(ev, AllBlocksCleared):
        return epb.EngineEvent(cleared=epb.AllBlocksCleared())
    if isinstance(ev, AdapterLoaded):
        src = (sources or {}).get(ev.adapter, "")
        return epb.EngineEvent(adapter_loaded=epb.AdapterEvent(name=ev.adapter, tier=ev.tier, source_uri=src))
    if isinstance(ev, AdapterUnloaded):
        return epb.EngineEvent(adapter_unloaded=epb.AdapterEvent(name=ev.adapter, tier=ev.tier))
    if isinstance(ev, LoadSample):
        return epb.EngineEvent(sample=sample_to_pb(ev))
    raise TypeError(f"not an engine event: {ev!r}")


def _medium(wire: str) -> str:
    """A KV event's medium: "gpu" unless the engine said "cpu" (any case, as vLLM's "CPU")."""
    return "cpu" if wire.lower() == "cpu" else "gpu"


def event_from_pb(replica_id: str, m: epb.EngineEvent) -> EngineEvent | None:
    """The router-side event for a wire message (``None`` for an unknown/empty kind)."""
    kind = m.WhichOneof("kind")
    if kind == "stored":
        return BlockStored(replica_id, tuple(m.stored.block_hashes), _medium(m.stored.medium))
    if kind == "removed":
        return BlockRemoved(replica_id, tuple(m.removed.block_hashes), _medium(m.removed.medium))
    if kind == "cleared":
        return AllBlocksCleared(replica_id)
    if kind == "adapter_loaded":
        tier = m.adapter_loaded.tier
        return AdapterLoaded(replica_id, m.adapter_loaded.name, "cpu" if tier == "cpu" else "gpu")
    if kind == "adapter_unloaded":
        tier = m.adapter_unloaded.tier
        return AdapterUnloaded(replica_id, m.adapter_unloaded.name, "cpu" if tier == "cpu" else "gpu")
    if kind == "sample":
        s = m.sample
        return LoadSample(
            replica_id=replica_id,
            time=s.time,
            running=s.running,
            waiting=s.waiting,
            waiting_prefill_tokens=s.waiting_prefill_tokens,
            running_tokens=s.running_tokens,
            kv_usage=s.kv_usage,
        )
    return None


def snapshot_to_pb(
    info: EngineInfo,
    resident_blocks: Iterable[int],
    adapters: Sequence[tuple[str, str, str]],
    seq: int,
    now: float,
) -> epb.EngineEventBatch:
    """The first message of a subscription. ``adapters``: (name, tier, source_uri) triples."""
    return epb.EngineEventBatch(
        seq=seq,
        snapshot=True,
        info=info.to_pb(),
        resident_blocks=list(resident_blocks),
        adapters=[epb.AdapterResidency(name=n, tier=t, source_uri=s) for n, t, s in adapters],
        time=now,
    )


def candidate_to_pb(c: CandidateCost) -> rpb.CandidateCost:
    """One candidate's cost terms; only numeric ``extra`` entries travel."""
    extra = {k: float(v) for k, v in (c.extra or {}).items() if isinstance(v, (int, float))}
    return rpb.CandidateCost(
        replica_id=c.replica_id,
        gpu_class=c.gpu_class,
        total_s=c.total_s,
        queue_s=c.queue_s,
        prefill_s=c.prefill_s,
        adapter_s=c.adapter_s,
        cached_blocks=c.cached_blocks,
        adapter_tier=c.adapter_tier,
        extra=extra,
    )


def candidate_from_pb(m: rpb.CandidateCost) -> CandidateCost:
    return CandidateCost(
        replica_id=m.replica_id,
        gpu_class=m.gpu_class,
        total_s=m.total_s,
        queue_s=m.queue_s,
        prefill_s=m.prefill_s,
        adapter_s=m.adapter_s,
        cached_blocks=m.cached_blocks,
        adapter_tier=m.adapter_tier,
        extra=dict(m.extra),
    )


def decision_from_pb(m: rpb.ExplainResponse) -> Decision:
    """The policy core's ``Decision`` back from an ``ExplainResponse``."""
    return Decision(
        replica_id=m.replica_id,
        policy=m.policy,
        reason=m.reason,
        cached_blocks=m.cached_blocks,
        candidates=[candidate_from_pb(c) for c in m.candidates],
    )
