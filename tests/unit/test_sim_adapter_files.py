"""The sim engine's adapter files (issue 14, faults): with an adapter cache it fetches and validates a
``file://`` source on first use like the vLLM engine, so a missing or corrupt file is refused naming the
adapter and is not registered; a good one is, and other requests are unaffected. Without a cache (the
default) sources are only recorded, as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from corral.serve.adapter_sources import AdapterSourceError
from corral.serve.endpoint import EngineRequest
from corral.serve.endpoint.sim import SimEndpointEngine
from corral.serve.local_adapters import make_tiny_adapter


def _req(adapter: str | None, source: str | None) -> EngineRequest:
    return EngineRequest(
        request_id=f"r-{adapter}", model="m", prompt_token_ids=[1, 2, 3], max_tokens=2,
        adapter=adapter, adapter_source=source,
    )  # fmt: skip


async def _run(eng: SimEndpointEngine, req: EngineRequest) -> int:
    return sum(len(c.token_ids) for c in [c async for c in eng.generate(req)])


async def test_missing_and_corrupt_files_are_refused_naming_the_adapter(tmp_path: Path) -> None:
    eng = SimEndpointEngine.create("H100", "h0", "m", time_scale=100.0, adapter_cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not-json")
    try:
        with pytest.raises(AdapterSourceError, match=r"adapter 'gone': .* does not exist"):
            await _run(eng, _req("gone", (tmp_path / "gone").as_uri()))
        with pytest.raises(AdapterSourceError, match=r"adapter 'bad': .*not a valid safetensors file"):
            await _run(eng, _req("bad", bad.as_uri()))
        with pytest.raises(AdapterSourceError, match="adapter 'bad'"):
            await eng.load_adapter("bad", bad.as_uri(), "gpu")
        assert not eng.has_adapter("gone") and not eng.has_adapter("bad")
        good = make_tiny_adapter(tmp_path / "good")
        assert await _run(eng, _req("good", good.as_uri())) == 2
        assert eng.has_adapter("good")
        assert await _run(eng, _req(None, None)) == 2  # the base model is unaffected
        assert await _run(eng, _req("remote", "s3://bucket/remote")) == 2  # not fetchable here: recorded only
    finally:
        await eng.close()


async def test_without_a_cache_sources_are_only_recorded(tmp_path: Path) -> None:
    eng = SimEndpointEngine.create("H100", "h0", "m", time_scale=100.0)
    try:
        assert await _run(eng, _req("x", (tmp_path / "nowhere").as_uri())) == 2
        assert eng.has_adapter("x")
    finally:
        await eng.close()
