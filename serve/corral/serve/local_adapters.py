"""Adapter localisation for local mode: make every adapter of a pool loadable on this machine.

An example written for a GPU cluster names adapters on ``s3://`` or ``hf://`` (not fetchable here, no
credentials or network) or on a ``file://`` path of another machine. :func:`localize_adapters` points each
such adapter at a tiny generated PEFT-style LoRA adapter of the same rank (:func:`make_tiny_adapter`,
deterministic per name) so the engines' load/unload path runs for real; callers say so in their output.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from .adapter_sources import AdapterSourceError, parse_source


def fetchable(uri: str) -> bool:
    """Whether :func:`corral.serve.adapter_sources.fetch_adapter` can fetch ``uri`` on this machine."""
    try:
        src = parse_source(uri)
    except AdapterSourceError:
        return False
    return src.scheme == "file" and Path(src.location).exists()


def make_tiny_adapter(dest: Path, rank: int = 8, hidden: int = 64) -> Path:
    """A tiny but well-formed PEFT-style LoRA adapter (safetensors + adapter_config.json)."""
    import numpy as np
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    w = dest / "adapter_model.safetensors"
    if not w.exists():
        rng = np.random.default_rng(zlib.crc32(dest.name.encode()))
        tensors = {}
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.0.self_attn.{proj}"
            tensors[f"{pre}.lora_A.weight"] = rng.standard_normal((rank, hidden), np.float32) * 0.01
            tensors[f"{pre}.lora_B.weight"] = np.zeros((hidden, rank), np.float32)
        save_file(tensors, str(w))
        cfg = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
        (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def localize_adapters(pool: dict[str, Any], cache_dir: Path) -> list[str]:
    """Point adapters whose source is not fetchable here at generated tiny adapters; returns their names."""
    replaced = []
    for a in (pool.get("spec") or {}).get("adapters") or []:
        if not fetchable(a.get("source", "")):
            rank = int(a.get("rank") or 8)
            d = make_tiny_adapter(cache_dir / f"{a['name']}-r{rank}", rank=min(rank, 64))
            a["source"] = d.resolve().as_uri()
            replaced.append(a["name"])
    return replaced
