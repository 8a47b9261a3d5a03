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
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise _ClientGone()
    return task.result()


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


@router.get("/v1/models")
@router.get("/serving-endpoints/models")
async def models(request: Request) -> Response:
    """OpenAI ``GET /v1/models``: one model per serving endpoint (``id`` = endpoint name)."""
    eps = request.app.state.fm.registry.all()
    data = [{"id": ep.name, "object": "model", "created": ep.created_ms // 1000,
             "owned_by": "fmserve", "task": ep.task} for ep in eps]
    return Response(orjson.dumps({"object": "list", "data": data}),
                    media_type="application/json")
