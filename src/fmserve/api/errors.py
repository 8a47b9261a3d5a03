"""The one place errors become HTTP responses (spec §8.7).

``FmserveError`` → its status and ``{"error_code", "message"}``; unknown routes →
404 ``ENDPOINT_NOT_FOUND``; anything unexpected → 500 ``INTERNAL_ERROR`` with a
generic message (the traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from fmserve.errors import FmserveError

log = logging.getLogger("fmserve.api")

_STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST", 413: "BAD_REQUEST",
                 429: "REQUEST_LIMIT_EXCEEDED", 503: "TEMPORARILY_UNAVAILABLE"}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error_code": code, "message": message}), status_code=status,
                    media_type="application/json", headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(FmserveError)
    async def _fmserve(_: Request, exc: FmserveError) -> Response:
        if exc.status_code >= 500 and exc.status_code != 503:
            log.error("internal error: %s", exc.message)
        return error_response(exc.status_code, exc.error_code, exc.message, exc.headers())

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            msg = f"No API found for '{request.method} {request.url.path}'."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on '{request.url.path}'."
        else:
            msg = str(exc.detail)
        return error_response(exc.status_code, _STATUS_CODES.get(exc.status_code, "BAD_REQUEST"),
                              msg, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "INTERNAL_ERROR",
                              "Internal error while serving the request; see the server log.")
