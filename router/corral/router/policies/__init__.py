"""Built-in routing policies, one module each, registered by name on import (see README.md)."""

from . import (
    approx_prefix,
    chbl,
    corral,
    dualmap,
    least_loaded,
    lora_affinity,
    pow2,
    precise_prefix,
    random_pick,
    round_robin,
)

__all__ = [
    "approx_prefix",
    "chbl",
    "corral",
    "dualmap",
    "least_loaded",
    "lora_affinity",
    "pow2",
    "precise_prefix",
    "random_pick",
    "round_robin",
]
