"""Query routes (spec §1, §6, §7): native invocations and the OpenAI-compatible API.

``/serving-endpoints/{name}/invocations``,
``/serving-endpoints/{name}/served-models/{entity}/invocations``,
``/serving-endpoints/{chat/completions,completions,embeddings}`` and the same
under ``/v1``; ``GET /v1/models``. Every response carries the
``served-model-name`` header (spec §6.2).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fmserve.api.deps import principal, read_json
from fmserve.errors import FmserveError
from fmserve.gateway.policy import RequestContext
from fmserve.serving.query import Result

router = APIRouter(dependencies=[Depends(principal)])

_DONE = b"data: [DONE]\n\n"


class _ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable[Result]) -> Result:
    """Runs ``work``; if the client disconnects first, cancels it (freeing the worker)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))

    def on_gone(g: asyncio.Future[None]) -> None:
        if not g.cancelled():
            task.cancel()

    gone.add_done_callback(on_gone)
    try:
        return await task
    except asyncio.CancelledError:
        if gone.done() and not gone.cancelled():
            raise _ClientGone() from None
        raise
    finally:
        gone.cancel()


async def _sse(chunks: AsyncIterator[dict[str, Any]], on_end: Callable[[dict[str, Any] | None,
                                                                           int], None]):
    """``data: <json>`` events, then ``data: [DONE]`` (spec §8.3; no other line kinds).

    An error after the first event is sent as a ``data:`` event carrying both the
    Databricks (``error_code``/``message``) and OpenAI (``error``) shapes.
    """
    usage = None
    status = 200
    try:
        async for chunk in chunks:
            usage = chunk.get("usage", usage)
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except FmserveError as exc:
        status = exc.status_code
        body = {**exc.to_body(), "error": {"message": exc.message, "code": exc.error_code,
                                           "type": exc.error_code.lower()}}
        yield b"data: " + orjson.dumps(body) + b"\n\n"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        on_end(usage, status)
    yield _DONE


_Run = Callable[[RequestContext, dict[str, Any]], Awaitable[Result]]


async def _answer(request: Request, kind: str, run: _Run) -> Response:
    fm = request.app.state.fm
    started = time.perf_counter()
    ctx = RequestContext(principal=await principal(request), request_id=uuid.uuid4().hex)
    body = await read_json(request)
    name = str(body.get("model") or request.path_params.get("name") or "")
    try:
        entity, out, extra_headers = await _until_disconnect(request, run(ctx, body))
    except _ClientGone:
        return Response(status_code=499)
    except FmserveError as exc:
        fm.metrics.record(name or "-", kind, exc.status_code, time.perf_counter() - started, None)
        raise
    headers = {**extra_headers, "served-model-name": entity}
    if isinstance(out, dict):
        fm.metrics.record(name, kind, 200, time.perf_counter() - started, out.get("usage"),
                          entity)
        return Response(orjson.dumps(out), media_type="application/json", headers=headers)

    def on_end(usage: dict[str, Any] | None, status: int) -> None:
        fm.metrics.record(name, kind, status, time.perf_counter() - started, usage, entity)

    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(_sse(out, on_end), media_type="text/event-stream", headers=headers)


# Every query route, once: (path, kind). ``{name}`` / ``{entity}`` are path parameters
# (one non-empty segment each). FastAPI and :class:`FastQueryPath` both serve this table.
QUERY_ROUTES: tuple[tuple[str, str], ...] = (
    ("/serving-endpoints/{name}/invocations", "invocations"),
    ("/serving-endpoints/{name}/served-models/{entity}/invocations", "invocations"),
    *((f"{prefix}/{path}", kind) for prefix in ("/serving-endpoints", "/v1")
      for path, kind in (("chat/completions", "chat"), ("completions", "completions"),
                         ("embeddings", "embeddings"))),
)

# The OpenAI-compatible routes (their errors also carry OpenAI's envelope, api.errors):
# every /v1 route, and the /serving-endpoints ones the OpenAI client calls.
OPENAI_PREFIX = "/v1/"
OPENAI_PATHS = frozenset({*(p for p, _ in QUERY_ROUTES if "{" not in p),
                          "/serving-endpoints/models"})

_Handler = Callable[[Request], Awaitable[Response]]


def _handler(kind: str) -> _Handler:
    """The route handler of one kind; the served entity (``{entity}``) when the path names
    one, else the traffic config picks it."""
    async def handler(request: Request) -> Response:
        query, params = request.app.state.fm.query, request.path_params
        if kind == "invocations":
            return await _answer(request, kind, lambda ctx, body: query.invocations(
                ctx, params["name"], body, params.get("entity")))
        return await _answer(request, kind, getattr(query, kind))
    return handler


_HANDLERS = {kind: _handler(kind) for kind in {k for _, k in QUERY_ROUTES}}
for _path, _kind in QUERY_ROUTES:
    router.add_api_route(_path, _HANDLERS[_kind], methods=["POST"],
                         name=_kind, openapi_extra={"parameters": [
                             {"name": part[1:-1], "in": "path", "required": True,
                              "schema": {"type": "string"}}
                             for part in _path.split("/") if part.startswith("{")]})

_STATIC = {path: _HANDLERS[kind] for path, kind in QUERY_ROUTES if "{" not in path}
_TEMPLATES = [(path.split("/"), _HANDLERS[kind]) for path, kind in QUERY_ROUTES if "{" in path]


def _fast_route(path: str) -> tuple[_Handler, dict[str, str]] | None:
    """The handler of a query route and its path parameters (as the router would), or None."""
    handler = _STATIC.get(path)
    if handler is not None:
        return handler, {}
    parts = path.split("/")
    for template, handler in _TEMPLATES:
        if len(parts) != len(template):
            continue
        params: dict[str, str] = {}
        for want, got in zip(template, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return handler, params
    return None


class FastQueryPath:
    """ASGI middleware: ``POST`` to the query routes above, without FastAPI's routing
    and dependency machinery (a third of a request's CPU in a gateway benchmark).

    Same handlers, same authentication (:func:`principal` first, then the body), and
    ``FmserveError`` answered by the app's own exception handler; anything else
    propagates to the app's 500 handler as before. Other requests go to ``app``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (_fast_route(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "POST" else None)
        if route is None:
            await self.app(scope, receive, send)
            return
        handler, scope["path_params"] = route
        request = Request(scope, receive, send)
        try:
            await principal(request)
            response = await handler(request)
        except FmserveError as exc:
            response = await request.app.exception_handlers[FmserveError](request, exc)
        await response(scope, receive, send)


@router.get(OPENAI_PREFIX + "models")
@router.get("/serving-endpoints/models")
async def models(request: Request) -> Response:
    """OpenAI ``GET /v1/models``: one model per serving endpoint the caller may query
    (``id`` = endpoint name)."""
    ctx = RequestContext(principal=await principal(request), request_id=uuid.uuid4().hex)
    eps = request.app.state.fm.query.queryable(ctx)
    data = [{"id": ep.name, "object": "model", "created": ep.created_ms // 1000,
             "owned_by": "fmserve", "task": ep.task} for ep in eps]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")
