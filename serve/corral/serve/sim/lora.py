"""LoRA adapter residency of one sim replica, modelled on vLLM's ``LRUCacheWorkerLoRAManager``.

Two LRU tiers:
- **cpu** (host memory, ``max_cpu_loras``): every loaded adapter, like vLLM's registered-adapter cache.
  It includes the GPU-active ones (``max_cpu_loras >= max_loras``, as vLLM requires).
- **gpu** (``max_loras`` slots): the adapters a batch may use; one batch holds at most ``max_loras``
  distinct adapters.
An adapter in neither is on **disk**. Making an adapter GPU-resident costs
``GpuProfile.adapter_load_s(size_mb, tier)`` (disk -> GPU includes reading and deserialising; CPU -> GPU
is a PCIe copy). vLLM performs these loads inside the model runner before the forward pass, so the cost
is charged to the engine step that first uses the adapter (the whole batch waits).

Eviction is LRU among *unpinned* adapters (pinned = used by a request in the current batch). Residency
changes are reported as router events: ``AdapterLoaded(gpu)`` on activation, ``AdapterUnloaded(gpu)`` +
``AdapterLoaded(cpu)`` on demotion to host memory, ``AdapterUnloaded(cpu)`` when it leaves host memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection

from corral.api.profiles import GpuProfile
from corral.router.events import AdapterLoaded, AdapterUnloaded, EngineEvent


class AdapterSlots:
    """GPU and CPU LRU tiers of adapters on one replica, with load costs and events."""

    def __init__(
        self,
        replica_id: str,
        profile: GpuProfile,
        max_loras: int,
        max_cpu_loras: int,
        emit: Callable[[EngineEvent], None],
        default_mb: float,
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 (got {max_loras})")
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras})")
        self.replica_id = replica_id
        self.profile = profile
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._emit = emit
        self.default_mb = default_mb
        self.gpu: OrderedDict[str, None] = OrderedDict()  # LRU order: first = least recently used
        self.cpu: OrderedDict[str, None] = OrderedDict()  # superset of gpu
        self.size_mb: dict[str, float] = {}
        self.loads = {"disk": 0, "cpu": 0}  # GPU activations by the tier they came from
        self.load_seconds = 0.0

    def tier(self, name: str | None) -> str:
        if name is None or name in self.gpu:
            return "gpu"
        return "cpu" if name in self.cpu else "disk"

    def touch(self, name: str) -> None:
        if name in self.gpu:
            self.gpu.move_to_end(name)
        if name in self.cpu:
            self.cpu.move_to_end(name)

    def _evict_gpu(self, pinned: Collection[str]) -> bool:
        for victim in self.gpu:
            if victim not in pinned:
                del self.gpu[victim]
                self._emit(AdapterUnloaded(self.replica_id, victim, "gpu"))
                self._emit(AdapterLoaded(self.replica_id, victim, "cpu"))
                return True
        return False

    def _evict_cpu(self, pinned: Collection[str]) -> bool:
        # Prefer host-only adapters; a GPU-active one is deactivated too (vLLM's remove_adapter).
        for want_gpu in (False, True):
            for victim in self.cpu:
                if victim in pinned or (victim in self.gpu) != want_gpu:
                    continue
                del self.cpu[victim]
                if victim in self.gpu:
                    del self.gpu[victim]
                    self._emit(AdapterUnloaded(self.replica_id, victim, "gpu"))
                self._emit(AdapterUnloaded(self.replica_id, victim, "cpu"))
                return True
        return False

    def _to_cpu(self, name: str, pinned: Collection[str]) -> bool:
        if name in self.cpu:
            self.cpu.move_to_end(name)
            return True
        if len(self.cpu) >= self.max_cpu_loras and not self._evict_cpu(pinned):
            return False
        self.cpu[name] = None
        return True

    def can_activate(self, name: str, pinned: Collection[str]) -> bool:
        """Whether ``name`` is GPU-resident or a GPU slot can be freed without touching ``pinned``."""
        if name in self.gpu or len(self.gpu) < self.max_loras:
            return True
        return any(a not in pinned for a in self.gpu)

    def activate(self, name: str, pinned: Collection[str], size_mb: float | None = None) -> float | None:
        """Make ``name`` GPU-resident; returns the load time in seconds (0 if resident), None if no slot."""
        if size_mb is not None:
            self.size_mb[name] = size_mb
        if name in self.gpu:
            self.touch(name)
            return 0.0
        if len(self.gpu) >= self.max_loras and not self._evict_gpu(pinned):
            return None
        src = "cpu" if name in self.cpu else "disk"
        keep = {*pinned, name}
        if not self._to_cpu(name, keep):
            return None
        self.gpu[name] = None
        cost = self.profile.adapter_load_s(self.size_mb.get(name, self.default_mb), src)  # type: ignore[arg-type]
        self.loads[src] += 1
        self.load_seconds += cost
        self._emit(AdapterLoaded(self.replica_id, name, "gpu"))
        return cost

    def load(self, name: str, tier: str, pinned: Collection[str], size_mb: float | None = None) -> float:
        """Explicit load into ``tier`` ("gpu" or "cpu"); returns the time it costs (0 if already there)."""
        if size_mb is not None:
            self.size_mb[name] = size_mb
        if tier == "gpu":
            cost = self.activate(name, pinned)
            if cost is None:
                raise RuntimeError(f"no free GPU adapter slot for {name!r} (all {self.max_loras} in use)")
            return cost
        if tier != "cpu":
            raise ValueError(f"unknown adapter tier {tier!r}; expected 'gpu' or 'cpu'")
        if name in self.cpu:
            self.touch(name)
            return 0.0
        if not self._to_cpu(name, pinned):
            raise RuntimeError(f"no free CPU adapter slot for {name!r}")
        mb = self.size_mb.get(name, self.default_mb)
        cost = (self.profile.lora_load_fixed_ms + self.profile.lora_disk_to_cpu_ms_per_mb * mb) / 1e3
        self.load_seconds += cost
        self._emit(AdapterLoaded(self.replica_id, name, "cpu"))
        return cost

    def unload(self, name: str, tier: str, pinned: Collection[str]) -> str:
        """Demote (``tier="gpu"``: GPU -> CPU) or forget (``""``/``"cpu"``); returns the resulting tier."""
        if name in pinned:
            raise RuntimeError(f"adapter {name!r} is in use by running requests")
        if tier == "gpu":
            if name in self.gpu:
                del self.gpu[name]
                self._emit(AdapterUnloaded(self.replica_id, name, "gpu"))
                self._emit(AdapterLoaded(self.replica_id, name, "cpu"))
            return self.tier(name)
        if name in self.gpu:
            del self.gpu[name]
            self._emit(AdapterUnloaded(self.replica_id, name, "gpu"))
        if name in self.cpu:
            del self.cpu[name]
            self._emit(AdapterUnloaded(self.replica_id, name, "cpu"))
        return "disk"
