"""The API's own description, for authenticated callers only.

FastAPI serves ``/openapi.json`` and ``/docs`` without authentication by default; here
(the app turns FastAPI's off) both need the same credentials as every other API route:

- ``GET /openapi.json`` → the OpenAPI 3 document of every route (``app.openapi()``);
- ``GET /docs`` → the Swagger UI page, which loads ``/openapi.json``.

A browser cannot add a bearer token to a page it navigates to, so a 401 from these two
routes carries ``WWW-Authenticate: Basic realm="fmserve"``: the browser asks for a user
name and password — enter ``token`` and a personal access token (fmserve accepts
``Basic base64("token:<pat>")`` everywhere, spec §3.3) — and sends the same credentials
with the page's own request for ``/openapi.json``.

Errors: 401 ``UNAUTHENTICATED`` (Databricks shape) without valid credentials.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from fmserve.api.deps import json_response, principal
from fmserve.errors import Unauthenticated

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"

router = APIRouter(include_in_schema=False)


class _BrowserUnauthenticated(Unauthenticated):
    """A 401 that makes a browser prompt for Basic credentials."""

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "WWW-Authenticate": 'Basic realm="fmserve"'}


async def _authenticate(request: Request) -> None:
    try:
        await principal(request)
    except Unauthenticated as exc:
        raise _BrowserUnauthenticated(exc.message) from None


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> Response:
    await _authenticate(request)
    return json_response(request.app.openapi())


@router.get(DOCS_URL)
async def docs(request: Request) -> HTMLResponse:
    await _authenticate(request)
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - API")
