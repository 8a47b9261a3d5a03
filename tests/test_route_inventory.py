"""Every route of the app needs credentials, except a short, justified list.

The inventory is the app object itself (``create_app(...).routes``, built without running
its lifespan) plus the query routes the fast path (``api/query_routes.FastQueryPath``)
answers before FastAPI routes anything. Each route, every method, path parameters filled
with dummy values, is sent to a real server without credentials and with bad ones: the
answer must be 401 ``UNAUTHENTICATED``. A route added later without authentication fails
this test until it is guarded or added to :data:`PUBLIC` with its reason.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import fastapi.routing
import httpx
import pytest
from conftest import Server
from fastapi.routing import APIRoute
from starlette.routing import Route

from fmserve.api.app import create_app
from fmserve.api.query_routes import QUERY_ROUTES
from fmserve.config import ServerConfig

# path → why it answers without credentials.
PUBLIC = {
    "/health": "load balancers and orchestrators probe it without a token; it shows "
               "endpoint names and worker states, no data and no secrets",
    "/metrics": "Prometheus scrapes it without a token; labels carry endpoint and entity "
                "names, never a credential or a request's content",
    "/.well-known/databricks-config": "databricks-sdk reads the host metadata in every "
                                      "Config() before it has a token (spec §3.5)",
    "/oidc/.well-known/oauth-authorization-server": "OIDC discovery: OAuth clients read it "
                                                    "to find the token endpoint before they "
                                                    "hold a token (governance §4.1)",
    "/oidc/v1/token": "the OAuth token endpoint: clients authenticate to it with their "
                      "client id and secret, not a bearer token (governance §4.2)",
    "/oidc/jwks.json": "public keys that verify fmserve's access tokens; part of OIDC "
                       "discovery (jwks_uri), nothing secret",
}
# /docs and /openapi.json are not here: they need credentials like the API they
# describe (api/docs_routes.py; a browser is asked for Basic "token:<pat>").

_PARAM = re.compile(r"\{[^}]+\}")
_BAD_AUTH = {
    "none": None,
    "unknown bearer": "Bearer dapi0123456789abcdef0123456789abcdef",
    "malformed jwt": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
    "unknown basic": "Basic " + base64.b64encode(b"token:dapi-not-a-token").decode(),
}


def inventory() -> list[tuple[str, str]]:
    """Every (method, path template) the app answers."""
    app = create_app(ServerConfig(data_dir=Path("/nonexistent-unused")))
    # FastAPI >= 0.165 keeps included routers whole in app.routes; iter_route_contexts
    # flattens them into each route with its full path.
    flat = getattr(fastapi.routing, "iter_route_contexts", None)
    found: set[tuple[str, str]] = set()
    for ctx in (flat(app.routes) if flat else app.routes):
        route = getattr(ctx, "original_route", ctx)
        if not isinstance(route, APIRoute | Route):  # a Mount or websocket route would
            raise AssertionError(f"route kind not covered by this test: {route!r}")
        for method in ctx.methods or ():
            found.add((method, ctx.path))
    found |= {("POST", path) for path, _ in QUERY_ROUTES}
    return sorted(found, key=lambda mp: (mp[1], mp[0]))


ROUTES = inventory()
GUARDED = [(m, p) for m, p in ROUTES if p not in PUBLIC]


def _concrete(path: str) -> str:
    return _PARAM.sub("dummy-x", path)


def test_inventory_covers_the_api() -> None:
    """The walk sees the routes it should (so an empty walk cannot pass)."""
    paths = {p for _, p in ROUTES}
    for must in ("/api/2.0/serving-endpoints", "/api/2.0/serving-endpoints/{name}",
                 "/api/2.0/secrets/scopes/create", "/api/2.0/secrets/acls/put",
                 "/api/2.0/permissions/serving-endpoints/{serving_endpoint_id}",
                 "/serving-endpoints/{name}/invocations", "/v1/chat/completions",
                 "/v1/models", "/openapi.json", "/docs", "/health"):
        assert must in paths, must
    assert ("PATCH", "/api/2.0/permissions/serving-endpoints/{serving_endpoint_id}") in ROUTES
    assert len(GUARDED) >= 40


@pytest.mark.parametrize(("method", "path"), GUARDED, ids=[f"{m} {p}" for m, p in GUARDED])
def test_route_needs_credentials(gateway: Server, method: str, path: str) -> None:
    url = _concrete(path)
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        for what, header in _BAD_AUTH.items():
            headers = {"Authorization": header} if header else {}
            body: dict[str, str] | None = {} if method in ("POST", "PUT", "PATCH") else None
            r = c.request(method, url, headers=headers, json=body)
            assert r.status_code == 401, (what, r.status_code, r.text)
            assert r.json()["error_code"] == "UNAUTHENTICATED", (what, r.text)
            assert gateway.token not in r.text


def test_public_routes_answer_without_credentials(gateway: Server) -> None:
    """The public GET routes that exist really are public (and the list holds no route
    that needs a token)."""
    public_gets = [p for m, p in ROUTES if p in PUBLIC and m == "GET"]
    assert {"/health", "/metrics", "/.well-known/databricks-config"} <= set(public_gets)
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        for path in public_gets:
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text)


def test_docs_need_credentials_and_ask_a_browser(gateway: Server) -> None:
    """``/docs`` and ``/openapi.json``: 401 with a Basic challenge (a browser prompts);
    with ``token:<pat>`` the page and the document it loads are served."""
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        for path in ("/docs", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Basic ")
        auth = ("token", gateway.token)
        page = c.get("/docs", auth=auth)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/openapi.json" in page.text and gateway.token not in page.text
        doc = c.get("/openapi.json", auth=auth)
        assert doc.status_code == 200
        described = set(doc.json()["paths"])
        assert "/api/2.0/permissions/serving-endpoints/{serving_endpoint_id}" in described
        assert "/docs" not in described and "/openapi.json" not in described
        bearer = c.get("/openapi.json", headers=gateway.headers)
        assert bearer.status_code == 200 and bearer.json() == doc.json()
