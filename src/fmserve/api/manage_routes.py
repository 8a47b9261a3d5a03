"""Endpoint-management routes (spec §2.3, §4): list and get serving endpoints.

Both ``/api/2.0/serving-endpoints`` and the trailing-slash form mlflow sends
answer list (spec §12.1); list is always ``{"endpoints": [...]}``.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import principal

router = APIRouter(prefix="/api/2.0/serving-endpoints", dependencies=[Depends(principal)])


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("")
@router.get("/")
async def list_endpoints(request: Request) -> Response:
    eps = request.app.state.fm.registry.all()
    return _json({"endpoints": [ep.as_dict() for ep in eps]})


@router.get("/{name}")
async def get_endpoint(request: Request, name: str) -> Response:
    return _json(request.app.state.fm.registry.get(name).as_dict())
