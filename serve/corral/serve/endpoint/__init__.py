"""corral.serve.endpoint: the gRPC endpoint that an engine replica (sim or vLLM) serves routers on.

- :class:`Engine` — the protocol an engine implements; :class:`EchoEngine` — a zero-cost engine.
- :class:`EngineEndpoint` — ``await EngineEndpoint.start(engine, host, port)`` / ``.address`` / ``stop()``.
"""

from .engine import (
    AdapterNotFoundError,
    EchoEngine,
    Engine,
    EngineEventSource,
    EngineInfo,
    EngineRequest,
    TokenChunk,
)
from .server import EngineEndpoint

__all__ = [
    "AdapterNotFoundError",
    "EchoEngine",
    "Engine",
    "EngineEndpoint",
    "EngineEventSource",
    "EngineInfo",
    "EngineRequest",
    "TokenChunk",
]
