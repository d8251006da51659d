"""Client-facing errors of the router service, each with its HTTP status, gRPC code and OpenAI type."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import grpc

_FIELD = re.compile(r"field '([^']+)'")


class RouterError(Exception):
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: message, type, param (the field at fault, if any), code."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.http_status,
            }
        }

    @property
    def param(self) -> str | None:
        m = _FIELD.search(self.message)
        return m.group(1) if m else None


class BadRequest(RouterError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class Unauthorized(RouterError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    type = "authentication_error"


class Forbidden(RouterError):
    """A valid API key without the right: an admin endpoint with an inference key, or a model the tenant may
    not use (the key file's ``tenants.<t>.models``)."""

    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    type = "permission_error"


class NotFound(RouterError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    type = "not_found_error"


class Unavailable(RouterError):
    """No healthy replica, or every attempt failed before the first token."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "service_unavailable_error"


class EngineFailed(RouterError):
    """The engine failed after the first token was sent to the client (not retried)."""

    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    type = "engine_error"


class InternalError(RouterError):
    """An unexpected failure in the router itself (a bug): an OpenAI-shaped 500, counted as 500."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    type = "internal_error"


class Overloaded(RouterError):
    """Every replica of the model is at its queue bound (RoutingPolicy ``load.maxQueueRequestsPerReplica``):
    HTTP 429 with ``Retry-After``, gRPC RESOURCE_EXHAUSTED."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PayloadTooLarge(RouterError):
    """A request body over the HTTP front's limit (:data:`.limits.HTTP_MAX_BODY_BYTES`)."""

    http_status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    type = "invalid_request_error"


class RequestTimeout(RouterError):
    """A request body that did not arrive within :data:`.limits.HTTP_BODY_TIMEOUT_S` (a slow client)."""

    http_status = 408
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    type = "invalid_request_error"
