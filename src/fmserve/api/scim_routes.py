"""Workspace SCIM API (governance spec §4.3): Users, ServicePrincipals, Groups, Me.

Under ``/api/2.0/preview/scim/v2``, for each of ``Users``, ``ServicePrincipals`` and
``Groups``::

    POST   /{type}        create            → 201 the resource
    GET    /{type}        list              → 200 ListResponse (filter, startIndex, count,
                                              attributes, excludedAttributes, sortBy,
                                              sortOrder)
    GET    /{type}/{id}   get               → 200 the resource
    PATCH  /{type}/{id}   PatchOp           → 200 the resource
    PUT    /{type}/{id}   replace           → 200 the resource
    DELETE /{type}/{id}   delete            → 204 (databricks-sdk ignores the body)
    GET    /Me            the caller        → 200 a User

Requests may be ``application/json`` (what databricks-sdk sends) or
``application/scim+json``; answers are ``application/json``. Errors are SCIM's
(``{"schemas", "detail", "status", "scimType"}``), a malformed body included; only the
401 of a missing or bad token keeps the Databricks shape every route shares. The rules
(admins write, everyone reads, built-in groups) are in :mod:`fmserve.gateway.scim`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.errors import FmserveError, ScimError
from fmserve.gateway.auth import Principal
from fmserve.gateway.scim import ScimService
from fmserve.gateway.scim_render import KINDS

PREFIX = "/api/2.0/preview/scim/v2"

router = APIRouter(prefix=PREFIX, dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]


def _service(request: Request) -> ScimService:
    """The app's one :class:`ScimService` (made on first use; it holds the write lock)."""
    state = request.app.state
    svc: ScimService | None = getattr(state, "scim", None)
    if svc is None:
        svc = ScimService(state.fm.identity)
        state.scim = svc
    return svc


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object body (``read_json``'s limits), its errors in SCIM's shape."""
    try:
        return await read_json(request)
    except FmserveError as exc:
        raise ScimError(exc.status_code, exc.message, "invalidSyntax"
                        if exc.status_code == 400 else None) from None


def _params(request: Request) -> dict[str, str]:
    return dict(request.query_params)


@router.get("/Me")
async def me(request: Request, who: Who) -> Response:
    return json_response(_service(request).me(who, _params(request)))


def _add_routes(resource_type: str) -> None:
    async def create(request: Request, who: Who) -> Response:
        body = await _body(request)
        return json_response(await _service(request).create(resource_type, body, who), 201)

    async def list_(request: Request) -> Response:
        return json_response(_service(request).search(resource_type, _params(request)))

    async def get(request: Request, rid: str) -> Response:
        return json_response(_service(request).get(resource_type, rid, _params(request)))

    async def patch(request: Request, rid: str, who: Who) -> Response:
        body = await _body(request)
        return json_response(await _service(request).patch(resource_type, rid, body, who))

    async def put(request: Request, rid: str, who: Who) -> Response:
        body = await _body(request)
        return json_response(await _service(request).replace(resource_type, rid, body, who))

    async def delete(request: Request, rid: str, who: Who) -> Response:
        await _service(request).delete(resource_type, rid, who)
        return Response(status_code=204)

    one = f"/{resource_type}/{{rid}}"
    for path, fn, method in ((f"/{resource_type}", create, "POST"),
                             (f"/{resource_type}", list_, "GET"),
                             (one, get, "GET"), (one, patch, "PATCH"), (one, put, "PUT"),
                             (one, delete, "DELETE")):
        name = fn.__name__.rstrip("_")
        router.add_api_route(path, fn, methods=[method], name=f"scim_{name}_{resource_type}",
                             summary=f"SCIM {name} {resource_type}")


for _resource_type in KINDS:
    _add_routes(_resource_type)
