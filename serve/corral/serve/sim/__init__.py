"""corral.serve.sim: the vLLM-faithful simulated engine (no Ray import) and its drivers.

- :class:`SimEngine` (:mod:`.engine`): one replica's scheduler, paged KV cache with prefix caching
  (:mod:`.kv_cache`), LoRA slots (:mod:`.lora`), step-time model and vLLM-named metrics (:mod:`.metrics`).
- :func:`simulate` (:mod:`.virtual`): virtual-time loop for one engine.
- :class:`RealtimeSimEngine` (:mod:`.realtime`): the same engine in wall-clock time under asyncio.
- :mod:`.workloads`: trace replay and synthetic workload generators.
- :mod:`.fleet`: N engines behind a routing policy in virtual time (the fleet benchmark's core).
"""

from .engine import SimEngine, SimSeq, Step
from .metrics import EngineMetrics, RequestRecord
from .realtime import RealtimeSimEngine, RequestSpec
from .virtual import simulate

__all__ = [
    "EngineMetrics",
    "RealtimeSimEngine",
    "RequestRecord",
    "RequestSpec",
    "SimEngine",
    "SimSeq",
    "Step",
    "simulate",
]
