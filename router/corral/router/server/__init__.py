"""corral.router.server: the router service (gRPC + OpenAI-compatible HTTP in one process).

``RouterServer`` (:mod:`.app`) wires :class:`~corral.router.server.core.Router` (request path, retries,
live policy swap, metrics, traces) to :mod:`.grpc_api` and :mod:`.http_api`. Run locally with
``python -m corral.router.server --engines HOST:PORT,... --policy corral``.
"""

from .app import RouterServer, load_api_keys
from .core import Router, RouterConfig
from .errors import BadRequest, EngineFailed, NotFound, RouterError, Unauthorized, Unavailable

__all__ = [
    "BadRequest",
    "EngineFailed",
    "NotFound",
    "Router",
    "RouterConfig",
    "RouterError",
    "RouterServer",
    "Unauthorized",
    "Unavailable",
    "load_api_keys",
]
