"""GPU performance profiles: the step-time and LoRA-load numbers shared by the sim engine and the router.

This module owns :class:`GpuProfile`, the built-in profiles :data:`BUILTIN_PROFILES` and
:func:`resolve_profile`. It is deliberately tiny and stable: the router's cost model and the sim engine
import it, so add fields only with defaults and never change a unit.

Step-time model (vLLM-style continuous batching), one engine step that runs ``p`` prefill and ``d``
decode tokens::

    step_us = b0_us + b1_us * p + b2_us * d

Sources for the numbers (Llama-3.1-8B class, bf16):

* H100 and A100-80GB ``b`` coefficients: published Llama-3.1-8B step-time fits (H100 b=(5753, 17.3,
  6.0) us, A100-80GB b=(16442, 47.8, 18.2) us), as used by the project's design notes.
* L4 has no published fit; it is scaled from H100: ``b1`` (prefill, compute-bound) by the
  ratio of dense bf16 FLOP/s, ``b0`` and ``b2`` (weight/KV reads, memory-bound) by the ratio of memory
  bandwidth. Peak figures from the NVIDIA datasheets: H100 SXM 989 TFLOP/s dense bf16 and 3.35 TB/s
  HBM3; A100-80GB SXM 312 TFLOP/s and 2.0 TB/s HBM2e; L4 121 TFLOP/s and 0.3 TB/s GDDR6.
* KV cache: 32 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 128 KiB per token. An 80 GB card
  keeps ~56 GB for KV after ~16 GB of weights and activations/graphs at vLLM's default
  ``gpu_memory_utilization=0.9`` -> ~430k tokens; a 24 GB L4 keeps ~5.6 GB -> ~45k tokens.
* LoRA: a rank-16 adapter on all seven linear projections of Llama-3.1-8B is ~84 MB in bf16
  (:func:`adapter_bytes`). CPU->GPU over PCIe Gen4 x16 at ~20 GB/s effective (pageable host memory;
  the 32 GB/s theoretical link is not reached) -> 0.05 ms/MB, a few ms per adapter. Disk->CPU including
  safetensors deserialisation at ~1 GB/s -> 1 ms/MB, ~85 ms per adapter: the thrash cliff. A fixed
  ~2 ms per load covers vLLM's adapter bookkeeping (slot assignment, Punica metadata).
* CPU KV tier (vLLM's CPU offloading connector, LMCache): KV blocks copied host->GPU from pinned memory
  by DMA reach ~80% of the link: PCIe Gen5 x16 (H100 SXM, 64 GB/s per direction) -> ~50 GB/s, Gen4 x16
  (A100, L4, 32 GB/s) -> ~25 GB/s. At 128 KiB per token a 512-token block takes ~1.3 ms on an H100
  (recomputing it: ~8.9 ms) and ~2.7 ms on an A100 (~24.5 ms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BUILTIN_PROFILES",
    "LORA_TARGETS",
    "GpuProfile",
    "LoraTier",
    "UnknownProfileError",
    "adapter_bytes",
    "adapter_mb",
    "resolve_profile",
]

LoraTier = Literal["gpu", "cpu", "disk"]
"""Where an adapter currently lives on a replica: already in a GPU slot, in host memory, or only on disk."""

LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
"""The linear projections of a Llama block a LoRA adapter can target (``all-linear`` = all seven)."""

_MB = 1_000_000  # LoRA sizes and link rates are in decimal MB (GB/s on datasheets are decimal)


class GpuProfile(BaseModel):
    """Performance profile of one GPU class serving one model size (frozen, hashable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Profile name, e.g. 'H100'.")
    b0_us: float = Field(ge=0, description="Fixed cost of one engine step in microseconds.")
    b1_us: float = Field(ge=0, description="Cost per prefill token in a step, microseconds.")
    b2_us: float = Field(ge=0, description="Cost per decode token (one per running sequence) in a step, us.")
    kv_capacity_tokens: int = Field(gt=0, description="Tokens the paged KV cache can hold.")
    max_num_batched_tokens: int = Field(default=8192, gt=0, description="Token budget of one step.")
    max_num_seqs: int = Field(default=256, gt=0, description="Maximum running sequences per step.")
    lora_cpu_to_gpu_ms_per_mb: float = Field(
        default=0.05, ge=0, description="Host->GPU copy time of an adapter per MB (PCIe), ms."
    )
    lora_disk_to_cpu_ms_per_mb: float = Field(
        default=1.0, ge=0, description="Disk->host read and deserialisation time per MB, ms."
    )
    lora_load_fixed_ms: float = Field(default=2.0, ge=0, description="Fixed cost of any adapter load, ms.")
    kv_bytes_per_token: int = Field(
        default=131072, gt=0, description="KV-cache bytes per token (all layers)."
    )
    pcie_h2d_gbps: float = Field(
        default=25.0, gt=0, description="Host->GPU copy rate of KV blocks from pinned memory (PCIe), GB/s."
    )
    peak_bf16_tflops: float = Field(default=0.0, ge=0, description="Dense bf16 TFLOP/s (documentation).")
    mem_bandwidth_tbps: float = Field(default=0.0, ge=0, description="Memory bandwidth TB/s (documentation).")

    def step_us(self, prefill_tokens: int = 0, decode_tokens: int = 0) -> float:
        """Duration of one engine step in microseconds."""
        return self.b0_us + self.b1_us * prefill_tokens + self.b2_us * decode_tokens

    def step_s(self, prefill_tokens: int = 0, decode_tokens: int = 0) -> float:
        """Duration of one engine step in seconds."""
        return self.step_us(prefill_tokens, decode_tokens) / 1e6

    def prefill_s(self, tokens: int) -> float:
        """Time to prefill ``tokens`` alone, chunked into steps of ``max_num_batched_tokens``; 0 for none."""
        if tokens <= 0:
            return 0.0
        steps = math.ceil(tokens / self.max_num_batched_tokens)
        return (steps * self.b0_us + self.b1_us * tokens) / 1e6

    def decode_step_s(self, batch: int) -> float:
        """Time of one decode step with ``batch`` running sequences (one token each)."""
        return (self.b0_us + self.b2_us * max(0, batch)) / 1e6

    def kv_load_s(self, tokens: int) -> float:
        """Time to copy the KV of ``tokens`` tokens from host memory to this GPU (a CPU KV-tier hit)."""
        return tokens * self.kv_bytes_per_token / (self.pcie_h2d_gbps * 1e9)

    def adapter_load_s(self, size_mb: float, tier: LoraTier) -> float:
        """Time to make an adapter of ``size_mb`` usable on the GPU when it currently lives in ``tier``."""
        if tier == "gpu":
            return 0.0
        if tier == "cpu":
            ms = self.lora_load_fixed_ms + self.lora_cpu_to_gpu_ms_per_mb * size_mb
        elif tier == "disk":
            per_mb = self.lora_disk_to_cpu_ms_per_mb + self.lora_cpu_to_gpu_ms_per_mb
            ms = self.lora_load_fixed_ms + per_mb * size_mb
        else:
            raise ValueError(f"unknown adapter tier {tier!r}; expected 'gpu', 'cpu' or 'disk'")
        return ms / 1e3


def adapter_bytes(
    rank: int,
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    kv_dim: int = 1024,
    layers: int = 32,
    targets: tuple[str, ...] = LORA_TARGETS,
    dtype_bytes: int = 2,
) -> int:
    """Size in bytes of a LoRA adapter (A: r x in, B: out x r per target); defaults are Llama-3.1-8B.

    >>> round(adapter_bytes(16) / 1e6, 1)
    83.9
    """
    dims = {
        "q": (hidden, hidden),
        "k": (hidden, kv_dim),
        "v": (hidden, kv_dim),
        "o": (hidden, hidden),
        "gate": (hidden, intermediate),
        "up": (hidden, intermediate),
        "down": (intermediate, hidden),
    }
    unknown = set(targets) - dims.keys()
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; expected a subset of {LORA_TARGETS}")
    per_layer = sum(rank * (dims[t][0] + dims[t][1]) for t in targets)
    return per_layer * layers * dtype_bytes


def adapter_mb(rank: int, **kwargs: Any) -> float:
    """Size in decimal MB of a LoRA adapter; see :func:`adapter_bytes` for the keyword arguments."""
    return adapter_bytes(rank, **kwargs) / _MB


_H100 = GpuProfile(
    name="H100",
    b0_us=5753.0,
    b1_us=17.3,
    b2_us=6.0,
    kv_capacity_tokens=430_000,
    peak_bf16_tflops=989.0,
    mem_bandwidth_tbps=3.35,
    pcie_h2d_gbps=50.0,
)
_A100_80GB = GpuProfile(
    name="A100-80GB",
    b0_us=16442.0,
    b1_us=47.8,
    b2_us=18.2,
    kv_capacity_tokens=430_000,
    peak_bf16_tflops=312.0,
    mem_bandwidth_tbps=2.0,
)
_L4_FLOPS = 121.0
_L4_BW = 0.3
_L4 = GpuProfile(
    name="L4",
    b0_us=round(_H100.b0_us * _H100.mem_bandwidth_tbps / _L4_BW, 1),  # ~64243 us: 16 GB weights / 0.3 TB/s
    b1_us=round(_H100.b1_us * _H100.peak_bf16_tflops / _L4_FLOPS, 2),  # ~141.4 us per prefill token
    b2_us=round(_H100.b2_us * _H100.mem_bandwidth_tbps / _L4_BW, 2),  # ~67.0 us per decode token
    kv_capacity_tokens=45_000,
    peak_bf16_tflops=_L4_FLOPS,
    mem_bandwidth_tbps=_L4_BW,
)

BUILTIN_PROFILES: Mapping[str, GpuProfile] = MappingProxyType({p.name: p for p in (_H100, _A100_80GB, _L4)})
"""Built-in profiles by canonical name: ``H100``, ``A100-80GB``, ``L4``."""

# Lower-cased aliases (including the nvidia.com/gpu.product labels of GPU feature discovery).
_ALIASES: dict[str, str] = {
    "h100": "H100",
    "h100-80gb": "H100",
    "nvidia-h100-80gb-hbm3": "H100",
    "a100": "A100-80GB",
    "a100-80gb": "A100-80GB",
    "nvidia-a100-sxm4-80gb": "A100-80GB",
    "l4": "L4",
    "nvidia-l4": "L4",
}


class UnknownProfileError(ValueError):
    """Raised by :func:`resolve_profile` for a name that is neither built in nor an alias."""


def resolve_profile(
    profile: str | GpuProfile,
    overrides: Mapping[str, Any] | None = None,
) -> GpuProfile:
    """Return the profile named ``profile`` (case-insensitive; GPU product labels accepted) or ``profile``
    itself, with ``overrides`` (GpuProfile field names, ``None`` values ignored) applied and validated.

    >>> resolve_profile("h100", {"kv_capacity_tokens": 200_000}).kv_capacity_tokens
    200000
    """
    if isinstance(profile, GpuProfile):
        base = profile
    else:
        canonical = _ALIASES.get(profile.strip().lower(), profile)
        try:
            base = BUILTIN_PROFILES[canonical]
        except KeyError:
            known = ", ".join(BUILTIN_PROFILES)
            raise UnknownProfileError(f"unknown GPU profile {profile!r}; built-in: {known}") from None
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not changes:
        return base
    return GpuProfile.model_validate({**base.model_dump(), **changes})
