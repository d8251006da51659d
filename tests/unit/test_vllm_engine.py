"""vLLM engine code path without vLLM: a faithful fake of the vLLM 0.33 names is injected via sys.modules,
with signatures copied from vLLM (``AsyncLLM.generate``/``add_lora``/``remove_lora``/``abort``,
``LoRARequest``, ``SamplingParams``, ``AsyncEngineArgs``, ``KVEventsConfig``) so wrong calls fail here."""

from __future__ import annotations

import enum
import inspect
import subprocess
import sys
import types
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from corral.router.events import AdapterLoaded, AdapterUnloaded, BlockRemoved, BlockStored
from corral.router.hashing import block_hashes, salt_for
from corral.serve.endpoint.engine import AdapterNotFoundError, Engine, EngineRequest
from corral.serve.vllm_engine import (
    KvEventTranslator,
    VllmEngine,
    VllmNotInstalled,
    import_vllm,
)

# ---- the fake vLLM -----------------------------------------------------------------------------------


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingParams:
    def __init__(
        self,
        n: int = 1,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        max_tokens: int | None = 16,
        min_tokens: int = 0,
        logprobs: int | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        if top_k < -1:
            raise ValueError("top_k must be -1 (disable), or at least 1")
        if not 0.0 < top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.max_tokens, self.output_kind, self.temperature = max_tokens, output_kind, temperature
        self.top_p, self.top_k, self.seed = top_p, top_k, seed


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    load_inplace: bool = False

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"id must be > 0, got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("lora_path cannot be empty")


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""


@dataclass
class AsyncEngineArgs:
    model: str = "facebook/opt-125m"
    tokenizer: str | None = None
    served_model_name: str | list[str] | None = None
    max_model_len: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    prefix_caching_hash_algo: str = "sha256"
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_events_config: KVEventsConfig | None = None
    disable_log_stats: bool = False
    enable_log_requests: bool = False

    def __post_init__(self) -> None:
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")


@dataclass
class _Completion:
    token_ids: list[int]
    text: str
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int] | None
    outputs: list[_Completion]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class _Fake:
    added: OrderedDict[int, LoRARequest] = field(default_factory=OrderedDict)
    generated: list[tuple[Any, Any, str, Any]] = field(default_factory=list)
    prompt_texts: list[str | None] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    silently_evicted: list[int] = field(default_factory=list)


class AsyncLLM:
    last: AsyncLLM | None = None

    def __init__(self, args: AsyncEngineArgs) -> None:
        self.args = args
        self.fake = _Fake()
        self.vllm_config = types.SimpleNamespace(
            cache_config=types.SimpleNamespace(num_gpu_blocks=1234),
            # vLLM resolves an unset max_model_len to the model's context length (8192 for this fake)
            model_config=types.SimpleNamespace(
                max_model_len=args.max_model_len or 8192,
                tokenizer=args.tokenizer or args.model,  # vLLM: the model's own unless given
                tokenizer_revision=None,
            ),
        )
        self.shut = False
        AsyncLLM.last = self

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs,
        start_engine_loop: bool = True,
        usage_context: Any = None,
        stat_loggers: list[Any] | None = None,
    ) -> AsyncLLM:
        assert isinstance(engine_args, AsyncEngineArgs)
        return cls(engine_args)

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: LoRARequest | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        assert isinstance(sampling_params, SamplingParams)
        if lora_request is not None:
            assert lora_request.lora_int_id in self.fake.added, "adapter not added before use"
        self.fake.generated.append((prompt, sampling_params, request_id, lora_request))
        self.fake.prompt_texts.append(prompt_text)
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else [1, 2, 3]
        n = sampling_params.max_tokens or 16
        assert sampling_params.output_kind is RequestOutputKind.DELTA
        for i in range(n):
            last = i == n - 1
            yield RequestOutput(
                request_id,
                ids,
                [_Completion([100 + i], f"t{i}", "length" if last else None)],
                finished=last,
                num_cached_tokens=16 if last else 0,
            )

    async def abort(self, request_id: str | list[str], internal: bool = False) -> None:
        self.fake.aborted.append(str(request_id))

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        assert isinstance(lora_request, LoRARequest)
        cap = self.args.max_cpu_loras or self.args.max_loras
        self.fake.added[lora_request.lora_int_id] = lora_request
        while len(self.fake.added) > cap:  # vLLM's silent LRU eviction
            self.fake.silently_evicted.append(self.fake.added.popitem(last=False)[0])
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        assert isinstance(lora_id, int)
        return self.fake.added.pop(lora_id, None) is not None

    async def list_loras(self) -> set[int]:
        return set(self.fake.added)

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    def mod(name: str, **attrs: Any) -> None:
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        monkeypatch.setitem(sys.modules, name, m)

    mod("vllm", SamplingParams=SamplingParams, AsyncEngineArgs=AsyncEngineArgs)
    mod("vllm.config", KVEventsConfig=KVEventsConfig)
    mod("vllm.engine", __path__=[])
    mod("vllm.engine.arg_utils", AsyncEngineArgs=AsyncEngineArgs)
    mod("vllm.inputs", TokensPrompt=dict)
    mod("vllm.lora", __path__=[])
    mod("vllm.lora.request", LoRARequest=LoRARequest)
    mod("vllm.sampling_params", SamplingParams=SamplingParams, RequestOutputKind=RequestOutputKind)
    mod("vllm.v1", __path__=[])
    mod("vllm.v1.engine", __path__=[])
    mod("vllm.v1.engine.async_llm", AsyncLLM=AsyncLLM)


def _adapter(d: Path) -> str:
    from safetensors.numpy import save_file

    d.mkdir(parents=True)
    save_file({"x.lora_A.weight": np.zeros((8, 16), np.float32)}, str(d / "adapter_model.safetensors"))
    return d.as_uri()


async def _engine(tmp_path: Path, **kw: Any) -> tuple[VllmEngine, list[Any]]:
    eng = await VllmEngine.create(
        replica_id="v0",
        model="llama",
        base_model="meta-llama/Llama-3.1-8B-Instruct",
        gpu_class="H100",
        profile="H100",
        max_loras=2,
        max_cpu_loras=kw.pop("max_cpu_loras", 3),
        adapter_cache_dir=str(tmp_path / "cache"),
        kv_events=False,
        **kw,
    )
    events: list[Any] = []
    eng.add_event_listener(events.append)
    return eng, events


# ---- tests -------------------------------------------------------------------------------------------


def test_missing_vllm_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VllmNotInstalled, match=r"pip install 'corral\[vllm\]'"):
        import_vllm()


def test_module_import_does_not_import_vllm() -> None:
    code = "import sys, corral.serve.vllm_engine; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_engine_args_and_protocol(fake_vllm: None, tmp_path: Path) -> None:
    eng, _ = await _engine(tmp_path, engine_args={"gpu_memory_utilization": 0.8})
    args = AsyncLLM.last.args  # type: ignore[union-attr]
    assert args.enable_lora and args.max_loras == 2 and args.max_cpu_loras == 3
    assert args.enable_prefix_caching and args.block_size == 16 and args.gpu_memory_utilization == 0.8
    assert args.model == "meta-llama/Llama-3.1-8B-Instruct" and args.served_model_name == ["llama"]
    assert isinstance(eng, Engine)
    assert eng.info.engine == "vllm" and eng.info.kv_capacity_blocks == 1234
    await eng.close()
    assert AsyncLLM.last.shut  # type: ignore[union-attr]


async def test_kv_events_config_uses_zmq_on_loopback(fake_vllm: None, tmp_path: Path) -> None:
    sig = inspect.signature(VllmEngine.create)
    assert sig.parameters["kv_events"].default is True
    eng = await VllmEngine.create(
        replica_id="v0", model="m", base_model="m", gpu_class="H100", profile="H100", kv_events=True,
        adapter_cache_dir=str(tmp_path),
    )  # fmt: skip
    cfg = AsyncLLM.last.args.kv_events_config  # type: ignore[union-attr]
    assert cfg is not None
    assert (
        cfg.enable_kv_cache_events and cfg.publisher == "zmq" and cfg.endpoint.startswith("tcp://127.0.0.1:")
    )
    await eng.close()


async def test_generate_streams_deltas_with_lora_and_usage(fake_vllm: None, tmp_path: Path) -> None:
    eng, events = await _engine(tmp_path)
    src = _adapter(tmp_path / "sql")
    req = EngineRequest("r1", "llama", list(range(40)), max_tokens=3, adapter="sql", adapter_source=src)
    chunks = [c async for c in eng.generate(req)]
    assert [c.token_ids for c in chunks] == [[100], [101], [102]]
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (
        "length",
        40,
        3,
        16,
    )
    prompt, _sp, rid, lora = AsyncLLM.last.fake.generated[0]  # type: ignore[union-attr]
    assert prompt == {"prompt_token_ids": list(range(40))} and rid == "r1"
    assert lora.lora_name == "sql" and Path(lora.lora_path, "adapter_model.safetensors").is_file()
    assert AdapterLoaded("v0", "sql", "gpu") in events

    with pytest.raises(AdapterNotFoundError):
        async for _ in eng.generate(EngineRequest("r2", "llama", [1, 2], adapter="nope")):
            pass
    with pytest.raises(ValueError, match="max_model_len"):
        async for _ in eng.generate(EngineRequest("r3", "llama", [1] * 9000)):
            pass


async def test_own_lru_prevents_silent_vllm_eviction(fake_vllm: None, tmp_path: Path) -> None:
    eng, events = await _engine(tmp_path, max_cpu_loras=2)
    for n in ("a", "b", "c"):
        await eng.load_adapter(n, _adapter(tmp_path / n), "cpu")
    fake = AsyncLLM.last.fake  # type: ignore[union-attr]
    assert fake.silently_evicted == []
    assert len(fake.added) == 2
    assert AdapterUnloaded("v0", "a", "cpu") in events
    tiers = {n: t for n, t, _ in eng.adapters()}
    assert tiers == {"a": "disk", "b": "cpu", "c": "cpu"}
    # Using an evicted adapter re-adds it (known on disk).
    async for _ in eng.generate(EngineRequest("r", "llama", [1, 2, 3], max_tokens=1, adapter="a")):
        pass
    assert {r.lora_name for r in fake.added.values()} == {"a", "c"}


async def test_unload_calls_remove_lora_not_the_http_api(fake_vllm: None, tmp_path: Path) -> None:
    eng, events = await _engine(tmp_path)
    await eng.load_adapter("a", _adapter(tmp_path / "a"), "gpu")
    fake = AsyncLLM.last.fake  # type: ignore[union-attr]
    assert await eng.unload_adapter("a", "gpu") == "cpu"  # demote: stays in vLLM's CPU cache
    assert len(fake.added) == 1
    assert await eng.unload_adapter("a", "") == ""
    assert len(fake.added) == 0 and not eng.has_adapter("a")
    assert AdapterUnloaded("v0", "a", "gpu") in events


async def test_abort_forwards_to_vllm(fake_vllm: None, tmp_path: Path) -> None:
    eng, _ = await _engine(tmp_path)
    gen = eng.generate(EngineRequest("r9", "llama", [1, 2, 3], max_tokens=5))
    await gen.__anext__()
    eng.abort("r9")
    await gen.aclose()  # type: ignore[attr-defined]
    import asyncio

    await asyncio.sleep(0)
    assert AsyncLLM.last.fake.aborted == ["r9"]  # type: ignore[union-attr]
    s = eng.load_sample()
    assert s.replica_id == "v0" and s.running == 0


def test_kv_translator_maps_vllm_hashes_to_corral_chain() -> None:
    t = KvEventTranslator("v0", block_size=4)
    toks = list(range(12))
    e1 = {"type": "BlockStored", "block_hashes": [111, 222], "parent_block_hash": None,
          "token_ids": toks[:8], "block_size": 4, "lora_name": "sql"}  # fmt: skip
    e2 = {"type": "BlockStored", "block_hashes": [333], "parent_block_hash": 222,
          "token_ids": toks[8:12], "block_size": 4, "lora_name": "sql"}  # fmt: skip
    want = block_hashes(toks, 4, salt_for("sql"))
    a, b = t.translate(e1), t.translate(e2)
    assert isinstance(a, BlockStored) and isinstance(b, BlockStored)
    assert list(a.block_hashes + b.block_hashes) == want
    r = t.translate({"type": "BlockRemoved", "block_hashes": [333, 999]})
    assert r == BlockRemoved("v0", (want[2],))
    orphan = {"type": "BlockStored", "block_hashes": [5], "parent_block_hash": 4242,
              "token_ids": [1, 2, 3, 4], "block_size": 4}  # fmt: skip
    assert t.translate(orphan) is None
    assert sorted(t.resident()) == sorted(want[:2])
    base = t.translate({"type": "BlockStored", "block_hashes": [b"\x00" * 24 + b"\x01" * 8],
                        "parent_block_hash": None, "token_ids": [1, 2, 3, 4], "block_size": 4})  # fmt: skip
    assert isinstance(base, BlockStored) and list(base.block_hashes) == block_hashes([1, 2, 3, 4], 4, None)


# ---- real tokens: the router's ids reach vLLM ---------------------------------------------------------


async def test_engine_reports_its_tokenizer_and_runs_the_routers_ids(fake_vllm: None, tmp_path: Path) -> None:
    from corral.router.tokenizer import load_tokenizer
    from tokenizer_testkit import make_tokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    eng, _ = await _engine(tmp_path, engine_args={"tokenizer": str(tok_dir)})
    assert eng.info.tokenizer == str(tok_dir.resolve())  # vLLM's model_config.tokenizer, a local folder
    tok = load_tokenizer(eng.info.tokenizer)
    text = "Where is the corral? hello world"
    ids = tok.encode(text)
    async for _ in eng.generate(EngineRequest("t1", "llama", ids, max_tokens=1, prompt=text)):
        pass
    fake = AsyncLLM.last.fake  # type: ignore[union-attr]
    assert fake.generated[-1][0] == {"prompt_token_ids": ids} and fake.prompt_texts[-1] == text
    await eng.close()


@pytest.mark.integration
async def test_router_sends_the_models_token_ids_to_vllm(fake_vllm: None, tmp_path: Path) -> None:
    """Through the router's HTTP front and the engine's gRPC endpoint: the router tokenizes with the
    tokenizer the vLLM engine reported at registration, and vLLM runs exactly those ids (so its blocks are
    the router's blocks), with OpenAI's default temperature when the client sent none."""
    import aiohttp
    from corral.router.server import RouterConfig, RouterServer
    from corral.router.tokenizer import load_tokenizer
    from corral.serve.endpoint import EngineEndpoint
    from tokenizer_testkit import SYSTEM, make_tokenizer

    tok_dir = make_tokenizer(tmp_path / "tok")
    eng, _ = await _engine(tmp_path, engine_args={"tokenizer": str(tok_dir)})
    ep = await EngineEndpoint.start(eng, "127.0.0.1", 0, sample_period_s=0.05)
    router = RouterServer([ep.address], RouterConfig(policy="round_robin"))
    await router.start("127.0.0.1", 0, 0)
    try:
        await router.wait_for_replicas(1, timeout=10)
        tok = load_tokenizer(str(tok_dir))
        fake = AsyncLLM.last.fake  # type: ignore[union-attr]
        text = "Where is the corral? hello world"
        body = {"model": "llama", "prompt": text, "max_tokens": 2}
        async with aiohttp.ClientSession() as s:
            async with s.post(router.http_url + "/v1/completions", json=body) as resp:
                out = await resp.json()
                assert resp.status == 200, out
            assert fake.generated[-1][0] == {"prompt_token_ids": tok.encode(text)}
            assert fake.generated[-1][1].temperature == 1.0  # omitted: OpenAI's default, not greedy
            assert out["usage"]["prompt_tokens"] == len(tok.encode(text))
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
            chat = {"model": "llama", "max_tokens": 1, "temperature": 0, "messages": messages}
            async with s.post(router.http_url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200, await resp.text()
        want = tok.apply_chat_template(messages)
        assert want is not None and want.startswith("<s><|system|>")
        assert fake.generated[-1][0] == {"prompt_token_ids": tok.encode(want, add_special_tokens=False)}
        assert fake.generated[-1][1].temperature == 0.0
    finally:
        await router.stop(0)
        await ep.stop(None)
        await eng.close()
