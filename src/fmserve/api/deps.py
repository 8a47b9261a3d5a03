"""Request helpers shared by the routes: authentication, bounded JSON bodies, JSON answers."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fmserve.errors import BadRequest, PayloadTooLarge
from fmserve.gateway.auth import Principal
from fmserve.protocol.validation import MAX_JSON_DEPTH, json_depth_over

# Bodies over the limit are read (and dropped) up to this size before the 413,
# so the client sees the error rather than a reset connection.
_DRAIN_LIMIT = 64 * 1024 * 1024


async def principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller (401 otherwise), remembered on the
    request so later calls are free.

    A cached token is answered on the event loop; only a cache miss (a database
    lookup) goes to the thread pool.
    """
    who: Principal | None = request.scope.get("fm.principal")
    if who is not None:
        return who
    auth = request.app.state.fm.auth
    header = request.headers.get("authorization")
    who = auth.cached(header) or await run_in_threadpool(auth.authenticate, header)
    request.scope["fm.principal"] = who
    return who


def json_response(body: object, status: int = 200) -> Response:
    """``body`` as an ``application/json`` response (orjson)."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body.

    Raises:
        PayloadTooLarge: 413 over ``max_body_bytes`` (4 MB by default, spec §10).
        BadRequest: 400 for malformed JSON, a non-object body, or one nested deeper
            than :data:`~fmserve.protocol.validation.MAX_JSON_DEPTH` levels.
    """
    limit = request.app.state.fm.config.max_body_bytes

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body exceeds the {limit // (1024 * 1024)} MB limit "
                               "for foundation model endpoints.")

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > _DRAIN_LIMIT:
        raise too_large()
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
        elif size > _DRAIN_LIMIT:
            break
    if size > limit:
        raise too_large()
    raw = b"".join(parts)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson stops at 1024 levels
            raise _too_deep() from None
        raise BadRequest(f"Malformed JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.")
    if json_depth_over(body):
        raise _too_deep()
    return body


def _too_deep() -> BadRequest:
    return BadRequest(f"Request body nests arrays/objects more than {MAX_JSON_DEPTH} levels "
                      "deep.")
