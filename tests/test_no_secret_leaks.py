"""No client secret, PAT or OAuth access token appears in any GET answer, error message,
metrics label or log line of the server, whatever the caller does with them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, gateway_server
from identities import new_sp

SCIM = "/api/2.0/preview/scim/v2"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-leak-") as s:
        yield s


def test_credentials_never_echoed(srv: Server) -> None:
    sp = new_sp(srv)
    with srv.client() as c:
        pat = c.post("/api/2.0/token/create", json={"comment": "leak"}).json()["token_value"]
        secret = c.post(f"/api/2.0/accounts/servicePrincipals/{sp.id}/credentials/secrets",
                        json={}).json()["secret"]
    minted = httpx.post(f"{srv.url}/oidc/v1/token", auth=(sp.name, secret),
                        data={"grant_type": "client_credentials", "scope": "all-apis"})
    jwt = minted.json()["access_token"]
    values = {"pat": pat, "secret": secret, "jwt": jwt, "sp-pat": sp.token,
              "admin-pat": srv.token}
    seen: list[str] = []
    # Wrong, tampered and misplaced credentials: every error body.
    for bad in (pat + "x", jwt[:-3] + "abc", secret, f"{jwt}.{pat}"):
        for path in ("/api/2.0/serving-endpoints", "/serving-endpoints/x/invocations",
                     "/v1/models"):
            r = httpx.get(f"{srv.url}{path}", headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code in (401, 405), r.text
            seen.append(r.text)
    r = httpx.post(f"{srv.url}/oidc/v1/token", auth=(sp.name, secret + "x"),
                   data={"grant_type": "client_credentials"})
    assert r.status_code == 401
    seen.append(r.text)
    r = httpx.post(f"{srv.url}/oidc/v1/token", data={
        "grant_type": "password", "client_id": sp.name, "client_secret": secret})
    assert r.status_code == 400
    seen.append(r.text)
    # Every GET an admin or the service principal can make.
    gets = ["/api/2.0/token/list", "/api/2.0/token-management/tokens", f"{SCIM}/Users",
            f"{SCIM}/ServicePrincipals", f"{SCIM}/Groups", f"{SCIM}/Me",
            f"{SCIM}/ServicePrincipals/{sp.id}", "/api/2.0/serving-endpoints",
            f"/api/2.0/accounts/servicePrincipals/{sp.id}/credentials/secrets",
            "/api/2.0/secrets/scopes/list", "/v1/models", "/.well-known/databricks-config",
            "/oidc/.well-known/oauth-authorization-server", "/oidc/jwks.json", "/health"]
    for token in (srv.token, jwt):
        for path in gets:
            r = httpx.get(f"{srv.url}{path}", headers={"Authorization": f"Bearer {token}"})
            seen.append(r.text)
    seen.append(httpx.get(f"{srv.url}/metrics").text)
    seen.append(srv.log())
    for name, value in values.items():
        for text in seen:
            assert value not in text, f"{name} leaked"
            assert value[8:40] not in text, f"part of {name} leaked"
