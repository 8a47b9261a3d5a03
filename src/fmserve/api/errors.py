"""The one place errors become HTTP responses (spec §8.7).

``FmserveError`` → its status and ``{"error_code", "message"}``; unknown routes →
404 ``ENDPOINT_NOT_FOUND``; anything unexpected → 500 ``INTERNAL_ERROR`` with a
generic message (the traceback goes to the server log, never to the client).

On the OpenAI-compatible routes (``/v1/...`` and ``/serving-endpoints/{chat/completions,
completions,embeddings,models}``) the body also carries OpenAI's envelope, ``"error":
{"message", "type", "param", "code"}`` (``code`` = the Databricks ``error_code``): the
``openai`` client reads that object (``APIStatusError.body``, ``.code``, ``.type``) and
clients built on it (LangChain, the Agents SDK) read ``error.message``; the Databricks SDK
and MLflow, which call ``/invocations``, read ``error_code``/``message``, unchanged there.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from fmserve.api.query_routes import OPENAI_PATHS, OPENAI_PREFIX
from fmserve.errors import FmserveError

log = logging.getLogger("fmserve.api")

_STATUS_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "ENDPOINT_NOT_FOUND", 405: "BAD_REQUEST", 413: "BAD_REQUEST",
                 429: "REQUEST_LIMIT_EXCEEDED", 503: "TEMPORARILY_UNAVAILABLE"}


# OpenAI error types by status (the values OpenAI-compatible servers use).
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                 409: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


def openai_route(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (declared with the query
    routes, :data:`fmserve.api.query_routes.OPENAI_PATHS`)."""
    return path.startswith(OPENAI_PREFIX) or path in OPENAI_PATHS


def error_body(status: int, code: str, message: str, openai: bool = False) -> dict[str, object]:
    """``{"error_code", "message"}``, plus OpenAI's ``error`` object when ``openai``."""
    body: dict[str, object] = {"error_code": code, "message": message}
    if openai:
        body["error"] = {"message": message,
                         "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500
                                                   else "invalid_request_error"),
                         "param": None, "code": code}
    return body


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None, openai: bool = False) -> Response:
    return Response(orjson.dumps(error_body(status, code, message, openai)),
                    status_code=status, media_type="application/json", headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(FmserveError)
    async def _fmserve(request: Request, exc: FmserveError) -> Response:
        if exc.status_code >= 500 and exc.status_code != 503:
            log.error("internal error: %s", exc.message)
        body = exc.to_body()
        if "error_code" in body and openai_route(request.url.path):
            body = error_body(exc.status_code, exc.error_code, exc.message, openai=True)
        return Response(orjson.dumps(body), status_code=exc.status_code,
                        media_type="application/json", headers=exc.headers())

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            msg = f"No API found for '{request.method} {request.url.path}'."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on '{request.url.path}'."
        else:
            msg = str(exc.detail)
        return error_response(exc.status_code, _STATUS_CODES.get(exc.status_code, "BAD_REQUEST"),
                              msg, dict(exc.headers or {}), openai_route(request.url.path))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "INTERNAL_ERROR",
                              "Internal error while serving the request; see the server log.",
                              openai=openai_route(request.url.path))
