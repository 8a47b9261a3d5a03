"""Endpoint-management routes (spec §2.3, §4, §12).

Both ``/api/2.0/serving-endpoints`` and the trailing-slash form mlflow sends
answer list and create; list is always ``{"endpoints": [...]}``; every 2xx has a
JSON body (DELETE → ``{}``), as mlflow requires. Permission checks live in
``serving/manager.py`` (view: ``CAN_VIEW``, change: ``CAN_MANAGE``), not here.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.gateway.auth import Principal
from fmserve.serving import catalog, observe

router = APIRouter(prefix="/api/2.0/serving-endpoints", dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]


def _fm(request: Request) -> Any:
    return request.app.state.fm


@router.get("")
@router.get("/")
async def list_endpoints(request: Request, who: Who) -> Response:
    return json_response({"endpoints": _fm(request).manager.visible(who)})


@router.post("")
@router.post("/")
async def create_endpoint(request: Request, who: Who) -> Response:
    return json_response(await _fm(request).manager.create(await read_json(request), who))


@router.get("/get-model-optimization-info/{model}/{version}")
async def optimization_info(model: str, version: str) -> Response:
    """Provisioned-throughput eligibility and step size (tokens/s) of a model (spec §2.4)."""
    return json_response(catalog.optimization_info(model))


@router.get("/{name}")
async def get_endpoint(request: Request, name: str, who: Who) -> Response:
    return json_response(_fm(request).manager.describe(who, name))


@router.delete("/{name}")
async def delete_endpoint(request: Request, name: str, who: Who) -> Response:
    await _fm(request).manager.delete(who, name)
    return json_response({})


@router.put("/{name}/config")
async def update_config(request: Request, name: str, who: Who) -> Response:
    body = await read_json(request)
    return json_response(await _fm(request).manager.update_config(who, name, body))


@router.patch("/{name}/tags")
async def patch_tags(request: Request, name: str, who: Who) -> Response:
    body = await read_json(request)
    return json_response({"tags": await _fm(request).manager.patch_tags(who, name, body)})


@router.put("/{name}/ai-gateway")
async def put_ai_gateway(request: Request, name: str, who: Who) -> Response:
    body = await read_json(request)
    return json_response(await _fm(request).manager.put_ai_gateway(who, name, body))


@router.put("/{name}/rate-limits")
async def put_rate_limits(request: Request, name: str, who: Who) -> Response:
    body = await read_json(request)
    limits = await _fm(request).manager.put_rate_limits(who, name, body)
    return json_response({"rate_limits": limits})


@router.get("/{name}/served-models/{entity}/logs")
async def logs(request: Request, name: str, entity: str, who: Who) -> Response:
    ep = _fm(request).manager.view(who, name)
    return json_response({"logs": observe.log_tail(observe.entity_worker(ep, entity))})


@router.get("/{name}/served-models/{entity}/build-logs")
async def build_logs(request: Request, name: str, entity: str, who: Who) -> Response:
    ep = _fm(request).manager.view(who, name)
    return json_response({"logs": observe.log_head(observe.entity_worker(ep, entity))})


@router.get("/{name}/metrics")
async def endpoint_metrics(request: Request, name: str, who: Who) -> Response:
    fm = _fm(request)
    ep = fm.manager.view(who, name)
    return Response(observe.endpoint_metrics(fm.metrics.registry, ep),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/{name}/openapi")
async def openapi(request: Request, name: str, who: Who) -> Response:
    ep = _fm(request).manager.view(who, name)
    base = str(request.base_url).rstrip("/")
    return Response(orjson.dumps(observe.openapi_doc(ep, base), option=orjson.OPT_INDENT_2),
                    media_type="text/plain; charset=utf-8")
