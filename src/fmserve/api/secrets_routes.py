"""Secrets REST API, as databricks-sdk ``WorkspaceClient().secrets`` calls it.

Under ``/api/2.0/secrets``:

- ``POST scopes/create`` ``{scope, initial_manage_principal?, scope_backend_type?}`` → ``{}``
- ``POST scopes/delete`` ``{scope}`` → ``{}`` (the scope's secrets go with it)
- ``GET scopes/list`` → ``{"scopes": [{"name", "backend_type": "DATABRICKS"}]}``
- ``POST put`` ``{scope, key, string_value | bytes_value (base64)}`` → ``{}``
  (creates or overwrites; the scope must exist)
- ``POST delete`` ``{scope, key}`` → ``{}``
- ``GET list?scope=`` → ``{"secrets": [{"key", "last_updated_timestamp" (ms)}]}``
- ``GET get`` → always 403 ``PERMISSION_DENIED``

Every store call runs in a worker thread (the store is blocking database I/O).
No answer ever contains a secret value: values are only resolved inside the server
(``{{secrets/scope/key}}`` references in external-model configs). Only the
``DATABRICKS`` backend exists; ACLs are not implemented (every authenticated token
manages every scope).

Errors: 400 ``INVALID_PARAMETER_VALUE`` (missing/bad field, bad name, bad base64,
value over 128 KB), 404 ``RESOURCE_DOES_NOT_EXIST`` (scope or key), 409
``RESOURCE_ALREADY_EXISTS`` (scope).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fmserve.api.deps import json_response, principal, read_json
from fmserve.errors import InvalidParameterValue, PermissionDenied
from fmserve.store.secrets import SecretStore

router = APIRouter(prefix="/api/2.0/secrets", dependencies=[Depends(principal)])

BACKEND = "DATABRICKS"


def _store(request: Request) -> SecretStore:
    store: SecretStore = request.app.state.fm.secrets
    return store


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParameterValue(f"'{name}' is required and must be a non-empty string.")
    return value


def _query(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise InvalidParameterValue(f"Query parameter '{name}' is required.")
    return value


@router.post("/scopes/create")
async def create_scope(request: Request) -> Response:
    body = await read_json(request)
    scope = _field(body, "scope")
    backend = body.get("scope_backend_type")
    if backend not in (None, BACKEND):
        raise InvalidParameterValue(
            f"scope_backend_type {backend!r} is not supported by fmserve; only "
            f"'{BACKEND}' scopes (stored encrypted in fmserve's database) exist.")
    principal_ = body.get("initial_manage_principal")
    if principal_ is not None and not isinstance(principal_, str):
        raise InvalidParameterValue("'initial_manage_principal' must be a string.")
    await asyncio.to_thread(_store(request).create_scope, scope)
    return json_response({})


@router.post("/scopes/delete")
async def delete_scope(request: Request) -> Response:
    scope = _field(await read_json(request), "scope")
    await asyncio.to_thread(_store(request).delete_scope, scope)
    return json_response({})


@router.get("/scopes/list")
async def list_scopes(request: Request) -> Response:
    scopes = await asyncio.to_thread(_store(request).list_scopes)
    return json_response({"scopes": [{"name": s, "backend_type": BACKEND} for s in scopes]})


@router.post("/put")
async def put_secret(request: Request) -> Response:
    body = await read_json(request)
    scope, key = _field(body, "scope"), _field(body, "key")
    text, raw = body.get("string_value"), body.get("bytes_value")
    if (text is None) == (raw is None):
        raise InvalidParameterValue("Exactly one of 'string_value' and 'bytes_value' "
                                    "must be set.")
    value: str | bytes
    if text is not None:
        if not isinstance(text, str):
            raise InvalidParameterValue("'string_value' must be a string.")
        value = text
    else:
        if not isinstance(raw, str):
            raise InvalidParameterValue("'bytes_value' must be a base64-encoded string.")
        try:
            value = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterValue("'bytes_value' is not valid base64.") from None
    await asyncio.to_thread(_store(request).put, scope, key, value)
    return json_response({})


@router.post("/delete")
async def delete_secret(request: Request) -> Response:
    body = await read_json(request)
    scope, key = _field(body, "scope"), _field(body, "key")
    await asyncio.to_thread(_store(request).delete, scope, key)
    return json_response({})


@router.get("/list")
async def list_secrets(request: Request) -> Response:
    items = await asyncio.to_thread(_store(request).list, _query(request, "scope"))
    return json_response({"secrets": [
        {"key": m.key, "last_updated_timestamp": m.last_updated_timestamp} for m in items]})


@router.get("/get")
async def get_secret(request: Request) -> Response:
    raise PermissionDenied(
        "fmserve never returns secret values through the API. Secrets are only usable "
        "inside the server, as {{secrets/<scope>/<key>}} references in external-model "
        "configs; list keys with GET /api/2.0/secrets/list.")
