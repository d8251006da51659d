"""The router fronts' hard limits against hostile or broken clients, in one place (documented in
``docs/reliability.md``, "Hostile input").

HTTP (aiohttp): a request body is at most :data:`HTTP_MAX_BODY_BYTES` (after decompression; more is a 413
naming the limit) and must arrive within :data:`HTTP_BODY_TIMEOUT_S` of the handler starting to read it
(else 408); request headers must be complete within :data:`HTTP_HEADER_TIMEOUT_S` of the connection
opening or of the previous response (else the connection is closed: aiohttp's keep-alive timer, which
also closes idle keep-alive connections); a request line or header is at most :data:`HTTP_MAX_LINE_BYTES`
and there are at most :data:`HTTP_MAX_HEADERS` headers (aiohttp answers 400). JSON nests at most
:data:`JSON_MAX_DEPTH` levels (orjson's fixed limit; deeper is a 400). A client that disconnects cancels
its request (the engine aborts it, the slot is freed; counted as 499).

gRPC: a message is at most :data:`GRPC_MAX_MESSAGE_BYTES`; bytes that do not decode as the method's
message are INVALID_ARGUMENT. Both fronts: a model name and a client request id are at most
:data:`MAX_NAME_CHARS` characters; an error message sent back is at most :data:`MAX_ERROR_CHARS`
characters (it rides in gRPC trailers, whose size is bounded). A request aiohttp's HTTP parser refuses (400)
is logged as one INFO line, not an ERROR with a traceback (:func:`quiet_refusals`): a hostile client cannot
flood the logs.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

HTTP_MAX_BODY_BYTES = 64 * 1024 * 1024
HTTP_BODY_TIMEOUT_S = 60.0
HTTP_HEADER_TIMEOUT_S = 75.0
HTTP_MAX_LINE_BYTES = 8190
HTTP_MAX_HEADERS = 128
JSON_MAX_DEPTH = 1024
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_NAME_CHARS = 1024
MAX_ERROR_CHARS = 4096


def clip(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` cut to ``limit`` characters (saying so): error details must fit gRPC trailers."""
    if len(message) <= limit:
        return message
    return message[: limit - 40] + f"... ({len(message) - limit + 40} more characters)"


class _QuietRefusals(logging.Filter):
    """aiohttp logs every request its parser refuses as an ERROR with a traceback: make it one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            record.msg = "refused a malformed HTTP request (%s): %s"
            record.args = (record.args[0] if isinstance(record.args, tuple) and record.args else "?",
                           " ".join(str(exc.message).split())[:200])  # fmt: skip
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_QUIET = _QuietRefusals()


def quiet_refusals() -> None:
    """Install the filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)
