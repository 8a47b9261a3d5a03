"""Serving-endpoint permissions API (governance §4.6), as databricks-sdk
``w.serving_endpoints.{get,set,update}_permissions`` / ``get_permission_levels`` and the
generic ``w.permissions`` (``request_object_type="serving-endpoints"``) call it.

Under ``/api/2.0/permissions/serving-endpoints``, keyed by the endpoint's ``id``
(``ServingEndpointDetailed.id``, not its name)::

    GET   /{serving_endpoint_id}                   → ServingEndpointPermissions   (CAN_VIEW)
    PUT   /{serving_endpoint_id}                   → ServingEndpointPermissions   (CAN_MANAGE)
    PATCH /{serving_endpoint_id}                   → ServingEndpointPermissions   (CAN_MANAGE)
    GET   /{serving_endpoint_id}/permissionLevels  → {"permission_levels": [...]} (CAN_VIEW)

Request body of PUT / PATCH::

    {"access_control_list": [{"user_name" | "group_name" | "service_principal_name": str,
                              "permission_level": "CAN_MANAGE" | "CAN_QUERY" | "CAN_VIEW"}]}

``service_principal_name`` is the service principal's ``applicationId``; names match
case-insensitively. PUT replaces every direct grant of the endpoint (a missing or empty
list clears them, as Databricks: "Deletes all direct permissions if none are specified");
PATCH upserts the listed principals and keeps the others. A principal listed twice gets
the highest level listed.

Answer::

    {"object_id": "/serving-endpoints/<id>", "object_type": "serving-endpoint",
     "access_control_list": [{"user_name" | "group_name" | "service_principal_name": str,
                              "display_name": str?,
                              "all_permissions": [{"permission_level", "inherited": bool,
                                                   "inherited_from_object": [str]?}]}]}

The direct grants (``inherited: false``), plus what holds without one: the ``admins``
group's ``CAN_MANAGE`` on user endpoints, and ``users``' ``CAN_QUERY`` on the bundled
pay-per-token endpoints, both ``inherited: true`` from ``/serving-endpoints/``.

Who may: reading the permissions (and the levels) needs ``CAN_VIEW`` — anyone who may see
the endpoint may see who else may; the ACL carries principal names only, which SCIM
already shows every authenticated principal. Changing them needs ``CAN_MANAGE`` (a
manager may remove their own grant; workspace admins keep ``CAN_MANAGE`` everywhere and
can always repair it). The bundled pay-per-token endpoints cannot be changed.

Errors (Databricks ``{"error_code", "message"}``): 404 ``RESOURCE_DOES_NOT_EXIST`` for an
unknown endpoint id (for every caller); 403 ``PERMISSION_DENIED`` naming the level needed;
400 ``INVALID_PARAMETER_VALUE`` for a body that is not an object, an
``access_control_list`` that is not a list, an entry that is not an object, names zero or
several principals or a level outside the enum (``IS_OWNER``, ``can_query``), an unknown
user, group or service principal (Databricks answers ``INVALID_PARAMETER_VALUE``
"Principal … does not exist" there too), and any PUT/PATCH on a pay-per-token endpoint.
The whole list is checked before anything is stored: a failed request changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.errors import InvalidParameterValue, ResourceDoesNotExist
from fmserve.gateway.auth import Principal
from fmserve.gateway.directory import Directory
from fmserve.gateway.policy import (
    CAN_MANAGE,
    CAN_QUERY,
    CAN_VIEW,
    LEVEL_DESCRIPTIONS,
    LEVELS,
    RANK,
    GatewayPolicy,
)
from fmserve.serving.endpoints import ServingEndpoint
from fmserve.store.principals import ADMINS, GROUP, SERVICE_PRINCIPAL, USER, USERS

PREFIX = "/api/2.0/permissions/serving-endpoints"
OBJECT_TYPE = "serving-endpoint"
ROOT_OBJECT = "/serving-endpoints/"

router = APIRouter(prefix=PREFIX, dependencies=[Depends(principal)])
Who = Annotated[Principal, Depends(principal)]

# ACL entry key → principal kind, in the order entries are answered.
_KEYS = {"user_name": USER, "group_name": GROUP, "service_principal_name": SERVICE_PRINCIPAL}
_KEY_OF = {kind: key for key, kind in _KEYS.items()}
_WHAT = {USER: "User", GROUP: "Group", SERVICE_PRINCIPAL: "Service principal"}


def _endpoint(request: Request, endpoint_id: str) -> ServingEndpoint:
    """The live endpoint whose ``id`` is ``endpoint_id``.

    Raises:
        ResourceDoesNotExist: 404.
    """
    for ep in request.app.state.fm.registry.all():
        if ep.id == endpoint_id:
            return ep  # type: ignore[no-any-return]
    raise ResourceDoesNotExist(f"Serving endpoint with id '{endpoint_id}' does not exist.")


def _policy(request: Request) -> GatewayPolicy:
    policy: GatewayPolicy = request.app.state.fm.policy
    return policy


def _inherited(level: str) -> dict[str, Any]:
    return {"permission_level": level, "inherited": True,
            "inherited_from_object": [ROOT_OBJECT]}


def render(directory: Directory, ep: ServingEndpoint) -> dict[str, Any]:
    """The endpoint's ``ServingEndpointPermissions`` (shape in the module docstring)."""
    entries: dict[str, dict[str, Any]] = {}  # principal id → entry
    order: dict[str, tuple[int, str]] = {}

    def entry(pid: str) -> dict[str, Any] | None:
        if pid in entries:
            return entries[pid]
        rec = directory.record(pid)
        if rec is None:  # a principal deleted since (its grants go with it)
            return None
        out: dict[str, Any] = {_KEY_OF[rec.kind]: rec.name}
        if rec.display_name:
            out["display_name"] = rec.display_name
        out["all_permissions"] = []
        entries[pid] = out
        order[pid] = (list(_KEYS.values()).index(rec.kind), rec.name.lower())
        return out

    if ep.user_created:
        for pid, level in directory.grants(ep.id).items():
            e = entry(pid)
            if e is not None:
                e["all_permissions"].append({"permission_level": level, "inherited": False})
        builtin, level = directory.builtin_group(ADMINS), CAN_MANAGE
    else:
        builtin, level = directory.builtin_group(USERS), CAN_QUERY
    e = entry(builtin) if builtin else None
    if e is not None:
        e["all_permissions"].append(_inherited(level))
    acl = [entries[pid] for pid in sorted(entries, key=lambda p: order[p])]
    return {"object_id": f"{ROOT_OBJECT}{ep.id}", "object_type": OBJECT_TYPE,
            "access_control_list": acl}


def parse_acl(directory: Directory, body: dict[str, Any]) -> dict[str, str]:
    """``access_control_list`` as principal id → level (the highest listed per principal).

    Raises:
        InvalidParameterValue: 400 (see the module docstring); nothing is looked up in
            the database.
    """
    acl = body.get("access_control_list")
    if acl is None:
        return {}
    if not isinstance(acl, list):
        raise InvalidParameterValue("'access_control_list' must be a list of "
                                    "{user_name|group_name|service_principal_name, "
                                    "permission_level} objects.")
    grants: dict[str, str] = {}
    for i, item in enumerate(acl):
        where = f"access_control_list[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameterValue(f"{where} must be an object.")
        named = [k for k in _KEYS if item.get(k) is not None]
        if len(named) != 1:
            raise InvalidParameterValue(
                f"{where} must name exactly one principal with one of "
                f"{', '.join(_KEYS)}; it names {len(named)}"
                + (f" ({', '.join(named)})" if named else "") + ".")
        key = named[0]
        name = item[key]
        if not isinstance(name, str) or not name:
            raise InvalidParameterValue(f"{where}.{key} must be a non-empty string.")
        level = item.get("permission_level")
        if level not in LEVELS:
            raise InvalidParameterValue(
                f"{where}.permission_level must be one of {', '.join(LEVELS)} for a serving "
                f"endpoint; got {level!r}.")
        rec = directory.find(_KEYS[key], name)
        if rec is None:
            raise InvalidParameterValue(
                f"Principal: {_WHAT[_KEYS[key]]} '{name}' ({key}) does not exist.")
        have = grants.get(rec.id)
        if have is None or RANK[level] > RANK[have]:
            grants[rec.id] = level
    return grants


@router.get("/{serving_endpoint_id}")
async def get_permissions(request: Request, serving_endpoint_id: str, who: Who) -> Response:
    ep = _endpoint(request, serving_endpoint_id)
    _policy(request).require(who, ep, CAN_VIEW)
    return json_response(render(request.app.state.fm.identity.directory, ep))


@router.get("/{serving_endpoint_id}/permissionLevels")
async def get_permission_levels(request: Request, serving_endpoint_id: str,
                                who: Who) -> Response:
    ep = _endpoint(request, serving_endpoint_id)
    _policy(request).require(who, ep, CAN_VIEW)
    return json_response({"permission_levels": [
        {"permission_level": level, "description": LEVEL_DESCRIPTIONS[level]}
        for level in reversed(LEVELS)]})


async def _change(request: Request, endpoint_id: str, who: Principal, *,
                  replace: bool) -> Response:
    ep = _endpoint(request, endpoint_id)
    if not ep.user_created:
        raise InvalidParameterValue(
            f"Endpoint '{ep.name}' is a pay-per-token endpoint: pay-per-token endpoints are "
            "queryable by every principal and cannot be changed.")
    _policy(request).require(who, ep, CAN_MANAGE)
    identity = request.app.state.fm.identity
    grants = parse_acl(identity.directory, await read_json(request))
    await identity.write(identity.permissions.set_grants, ep.id, grants, replace=replace)
    return json_response(render(identity.directory, ep))


@router.put("/{serving_endpoint_id}")
async def set_permissions(request: Request, serving_endpoint_id: str, who: Who) -> Response:
    return await _change(request, serving_endpoint_id, who, replace=True)


@router.patch("/{serving_endpoint_id}")
async def update_permissions(request: Request, serving_endpoint_id: str,
                             who: Who) -> Response:
    return await _change(request, serving_endpoint_id, who, replace=False)
