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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fmserve.api.deps import principal, read_json
from fmserve.errors import FmserveError
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


async def _answer(request: Request, kind: str, run: Callable[[dict[str, Any]],
                                                             Awaitable[Result]]) -> Response:
    fm = request.app.state.fm
    started = time.perf_counter()
    body = await read_json(request)
    name = str(body.get("model") or request.path_params.get("name") or "")
    try:
        entity, out, extra_headers = await _until_disconnect(request, run(body))
    except _ClientGone:
        return Response(status_code=499)
    except FmserveError as exc:
        fm.metrics.record(name or "-", kind, exc.status_code, time.perf_counter() - started, None)
        raise
    headers = {**extra_headers, "served-model-name": entity}
    if isinstance(out, dict):
        fm.metrics.record(name, kind, 200, time.perf_counter() - started, out.get("usage"))
        return Response(orjson.dumps(out), media_type="application/json", headers=headers)

    def on_end(usage: dict[str, Any] | None, status: int) -> None:
        fm.metrics.record(name, kind, status, time.perf_counter() - started, usage)

    headers["Cache-Control"] = "no-cache"
    return StreamingResponse(_sse(out, on_end), media_type="text/event-stream", headers=headers)


@router.post("/serving-endpoints/{name}/invocations")
async def invocations(request: Request, name: str) -> Response:
    return await _answer(request, "invocations",
                         lambda body: request.app.state.fm.query.invocations(name, body))


@router.post("/serving-endpoints/{name}/served-models/{entity}/invocations")
async def entity_invocations(request: Request, name: str, entity: str) -> Response:
    return await _answer(request, "invocations",
                         lambda body: request.app.state.fm.query.invocations(name, body, entity))


def _openai(path: str, kind: str) -> None:
    async def handler(request: Request) -> Response:
        query = request.app.state.fm.query
        return await _answer(request, kind, getattr(query, kind))

    for prefix in ("/serving-endpoints", "/v1"):
        router.add_api_route(f"{prefix}/{path}", handler, methods=["POST"],
                             name=f"{kind}{prefix.replace('/', '_')}")


_openai("chat/completions", "chat")
_openai("completions", "completions")
_openai("embeddings", "embeddings")


_KINDS = {f"{prefix}/{path}": kind for prefix in ("/serving-endpoints", "/v1")
          for path, kind in (("chat/completions", "chat"), ("completions", "completions"),
                             ("embeddings", "embeddings"))}


_Handler = Callable[[Request], Awaitable[Response]]


def _fast_route(path: str) -> tuple[_Handler, dict[str, str]] | None:
    """The handler of a query route and its path parameters (as the router would), or None."""
    kind = _KINDS.get(path)
    if kind is not None:
        return (lambda request: _answer(request, kind,
                                        getattr(request.app.state.fm.query, kind))), {}
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "serving-endpoints" and parts[2] \
            and parts[3] == "invocations":
        name = parts[2]
        return (lambda request: invocations(request, name)), {"name": name}
    if len(parts) == 6 and parts[1] == "serving-endpoints" and parts[2] \
            and parts[3] == "served-models" and parts[4] and parts[5] == "invocations":
        name, entity = parts[2], parts[4]
        return ((lambda request: entity_invocations(request, name, entity)),
                {"name": name, "entity": entity})
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


@router.get("/v1/models")
@router.get("/serving-endpoints/models")
async def models(request: Request) -> Response:
    """OpenAI ``GET /v1/models``: one model per serving endpoint (``id`` = endpoint name)."""
    eps = request.app.state.fm.registry.all()
    data = [{"id": ep.name, "object": "model", "created": ep.created_ms // 1000,
             "owned_by": "fmserve", "task": ep.task} for ep in eps]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")
