"""OAuth machine-to-machine (governance §4.1, §4.2, §4.4; main spec §3.4–3.5) with the real
clients: databricks-sdk ``client_id``/``client_secret``, mlflow's deploy client from the
environment and the openai client with an access token; the token endpoint's refusals in
RFC 6749's shape; tokens that are tampered with, foreign, or outlived by their secret or
service principal; the secrets API (through ``w.service_principal_secrets_proxy``) and
its CLI; and no secret or token in the server log.

The queries run on the session ``server`` (bundled models); everything else on this
module's own ``--no-bundled`` server with an external endpoint on the fake OpenAI.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from conftest import (
    CHAT,
    Server,
    create_external,
    fmserve_cmd,
    gateway_server,
)
from cryptography.hazmat.primitives.asymmetric import rsa
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import InvalidParameterValue, NotFound, PermissionDenied
from databricks.sdk.service.serving import (
    ChatMessage,
    ChatMessageRole,
    ServingEndpointAccessControlRequest,
    ServingEndpointPermissionLevel,
)
from fakes.openai import external_model, fake
from fakes.server import FakeServer
from openai import OpenAI, PermissionDeniedError

SCIM = "/api/2.0/preview/scim/v2"
SECRETS = "/api/2.0/accounts/servicePrincipals/{}/credentials/secrets"
LIST = "/api/2.0/serving-endpoints"
ISSUED: list[str] = []  # every secret and access token this module saw: never in a log


@pytest.fixture(scope="module")
def gw() -> Iterator[Server]:
    with gateway_server("fmserve-oauth-") as s:
        yield s


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    with fake() as f:
        yield f


def new_sp(srv: Server) -> dict[str, Any]:
    """A new service principal (SCIM), as the first admin."""
    with srv.client() as c:
        r = c.post(f"{SCIM}/ServicePrincipals", json={"displayName": f"sp-{time.time_ns()}"})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def new_secret(srv: Server, sp_id: str, **body: Any) -> dict[str, Any]:
    with srv.client() as c:
        r = c.post(SECRETS.format(sp_id), json=body)
    assert r.status_code == 200, r.text
    ISSUED.append(r.json()["secret"])
    return r.json()  # type: ignore[no-any-return]


def token_request(srv: Server, data: Any, auth: tuple[str, str] | None = None,
                  **kw: Any) -> httpx.Response:
    return httpx.post(f"{srv.url}/oidc/v1/token", data=data, auth=auth, timeout=30, **kw)


def access_token(srv: Server, client_id: str, secret: str, scope: str | None = None) -> str:
    data = {"grant_type": "client_credentials", **({"scope": scope} if scope else {})}
    r = token_request(srv, data, (client_id, secret))
    assert r.status_code == 200, r.text
    ISSUED.append(r.json()["access_token"])
    return r.json()["access_token"]  # type: ignore[no-any-return]


def status_with(srv: Server, token: str, path: str = LIST) -> int:
    return httpx.get(srv.url + path, headers={"Authorization": f"Bearer {token}"},
                     timeout=30).status_code


@pytest.fixture(scope="module")
def client_sp(server: Server) -> tuple[str, str]:
    """``(client_id, client_secret)`` of a service principal on the bundled server."""
    sp = new_sp(server)
    return sp["applicationId"], new_secret(server, sp["id"])["secret"]


# -- discovery -----------------------------------------------------------------------
def test_discovery_and_jwks_are_public(gw: Server) -> None:
    meta = httpx.get(f"{gw.url}/oidc/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == f"{gw.url}/oidc"
    assert meta["token_endpoint"] == f"{gw.url}/oidc/v1/token"
    assert meta["jwks_uri"] == f"{gw.url}/oidc/jwks.json"
    assert meta["authorization_endpoint"].startswith(f"{gw.url}/oidc/")
    assert meta["grant_types_supported"] == ["client_credentials"]
    assert meta["token_endpoint_auth_methods_supported"] == ["client_secret_basic",
                                                             "client_secret_post"]
    assert "all-apis" in meta["scopes_supported"] and meta["response_types_supported"]
    host_meta = httpx.get(f"{gw.url}/.well-known/databricks-config").json()
    assert host_meta["oidc_endpoint"] == meta["issuer"]  # how the SDK finds discovery
    # The published key verifies a minted token; the claims name the service principal.
    sp = new_sp(gw)
    tok = access_token(gw, sp["applicationId"], new_secret(gw, sp["id"])["secret"])
    keys = httpx.get(meta["jwks_uri"]).json()["keys"]
    kid = jwt.get_unverified_header(tok)["kid"]
    key = jwt.PyJWK({k: v for k, v in next(k for k in keys if k["kid"] == kid).items()})
    claims = jwt.decode(tok, key.key, algorithms=["RS256"], issuer=meta["issuer"])
    assert (claims["sub"], claims["pid"]) == (sp["applicationId"], sp["id"])
    assert claims["exp"] - claims["iat"] == 3600 and claims["scope"] == "all-apis"


# -- the real clients on the bundled server ------------------------------------------
def test_sdk_oauth_m2m(server: Server, client_sp: tuple[str, str]) -> None:
    cid, secret = client_sp
    w = WorkspaceClient(host=server.url, client_id=cid, client_secret=secret)
    assert w.config.auth_type == "oauth-m2m" and not w.config.token
    assert CHAT in {ep.name for ep in w.serving_endpoints.list()}
    assert w.serving_endpoints.get(CHAT).name == CHAT
    me = w.current_user.me()
    assert me.user_name == cid
    out = w.serving_endpoints.query(
        name=CHAT, messages=[ChatMessage(role=ChatMessageRole.USER, content="Say hello.")],
        max_tokens=8)
    assert out.choices and out.choices[0].message is not None
    assert out.usage is not None and 0 < (out.usage.completion_tokens or 0) <= 8


def test_mlflow_deploy_client_from_env(server: Server, client_sp: tuple[str, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", client_sp[0])
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", client_sp[1])
    deploy = get_deploy_client("databricks")
    assert CHAT in {ep["name"] for ep in deploy.list_endpoints()}
    out = deploy.predict(endpoint=CHAT, inputs={
        "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert 0 < out["usage"]["completion_tokens"] <= 8


def test_openai_with_an_access_token(server: Server, client_sp: tuple[str, str]) -> None:
    cid, secret = client_sp
    # client_secret_post this time (form fields instead of HTTP Basic).
    r = token_request(server, {"grant_type": "client_credentials", "client_id": cid,
                               "client_secret": secret})
    assert r.status_code == 200, r.text
    ISSUED.append(r.json()["access_token"])
    oa = OpenAI(api_key=r.json()["access_token"], base_url=f"{server.url}/serving-endpoints",
                max_retries=0)
    out = oa.chat.completions.create(model=CHAT, max_tokens=8,
                                     messages=[{"role": "user", "content": "Say hello."}])
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 8


def test_user_endpoint_needs_a_grant(gw: Server, upstream: FakeServer) -> None:
    name = f"oauth-ep-{time.time_ns()}"
    ep_id = create_external(gw, name, external_model(upstream.url))["id"]
    sp = new_sp(gw)
    cid, secret = sp["applicationId"], new_secret(gw, sp["id"])["secret"]
    w = WorkspaceClient(host=gw.url, client_id=cid, client_secret=secret)
    oa = OpenAI(api_key=access_token(gw, cid, secret), max_retries=0,
                base_url=f"{gw.url}/serving-endpoints")
    ask = [{"role": "user", "content": "hi"}]
    with pytest.raises(PermissionDeniedError):
        oa.chat.completions.create(model=name, messages=ask)  # type: ignore[arg-type]
    assert name not in {ep.name for ep in w.serving_endpoints.list()}
    admin = WorkspaceClient(host=gw.url, token=gw.token)
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        ServingEndpointAccessControlRequest(
            service_principal_name=cid, permission_level=ServingEndpointPermissionLevel.CAN_QUERY)])
    assert oa.chat.completions.create(model=name, messages=ask).choices  # type: ignore[arg-type]
    assert name in {ep.name for ep in w.serving_endpoints.list()}


# -- the token endpoint's answers -----------------------------------------------------
def test_token_success_shape(gw: Server) -> None:
    sp = new_sp(gw)
    cid, secret = sp["applicationId"], new_secret(gw, sp["id"])["secret"]
    # RFC 6749 §2.3.1: Basic credentials are form-urlencoded first (a no-op for these).
    r = token_request(gw, {"grant_type": "client_credentials", "scope": "all-apis"},
                      headers={"Authorization": "Basic " + base64.b64encode(
                          f"{quote(cid)}:{quote(secret)}".encode()).decode()})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    ISSUED.append(body["access_token"])
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer" and body["scope"] == "all-apis"
    assert type(body["expires_in"]) is int and body["expires_in"] == 3600
    assert r.headers["cache-control"] == "no-store"
    assert status_with(gw, body["access_token"]) == 200
    assert access_token(gw, cid, secret, "offline_access all-apis openid")  # no-op scopes
    bound = new_secret(gw, sp["id"], scopes=["all-apis"])["secret"]
    assert access_token(gw, cid, bound, "all-apis")
    over = token_request(gw, {"grant_type": "client_credentials",
                              "scope": "all-apis offline_access"}, (cid, bound))
    assert (over.status_code, over.json()["error"]) == (400, "invalid_scope")


def test_token_refusals(gw: Server) -> None:
    sp = new_sp(gw)
    cid, secret = sp["applicationId"], new_secret(gw, sp["id"])["secret"]
    grant = {"grant_type": "client_credentials"}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("wrong secret", {"data": grant, "auth": (cid, secret[:-1] + "0")}, 401,
         "invalid_client"),
        ("unknown client", {"data": grant, "auth": ("no-such-client", secret)}, 401,
         "invalid_client"),
        ("no credentials", {"data": grant}, 401, "invalid_client"),
        ("bearer, not basic", {"data": grant, "headers": {"Authorization": "Bearer x"}}, 401,
         "invalid_client"),
        ("both methods", {"data": {**grant, "client_id": cid, "client_secret": secret},
                          "auth": (cid, secret)}, 400, "invalid_request"),
        ("no grant_type", {"data": {"scope": "all-apis"}, "auth": (cid, secret)}, 400,
         "invalid_request"),
        ("password grant", {"data": {"grant_type": "password", "username": "u",
                                     "password": "p"}, "auth": (cid, secret)}, 400,
         "unsupported_grant_type"),
        ("sql scope", {"data": {**grant, "scope": "sql"}, "auth": (cid, secret)}, 400,
         "invalid_scope"),
        ("no all-apis", {"data": {**grant, "scope": "openid"}, "auth": (cid, secret)}, 400,
         "invalid_scope"),
        ("json body", {"json": grant, "auth": (cid, secret)}, 400, "invalid_request"),
        ("repeated", {"content": "grant_type=client_credentials&grant_type=x",
                      "auth": (cid, secret), "headers": {
                          "Content-Type": "application/x-www-form-urlencoded"}}, 400,
         "invalid_request"),
        ("secret in URL", {"data": grant, "params": {"client_secret": secret},
                           "auth": (cid, secret)}, 400, "invalid_request"),
        ("malformed Basic", {"data": grant, "headers": {"Authorization": "Basic !"}}, 401,
         "invalid_client"),
        ("not UTF-8", {"content": b"grant_type=%ff", "auth": (cid, secret), "headers": {
            "Content-Type": "application/x-www-form-urlencoded"}}, 400, "invalid_request"),
    ]
    for what, kw, status, error in cases:
        r = httpx.post(f"{gw.url}/oidc/v1/token", timeout=30, **kw)
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), what
        assert set(r.json()) == {"error", "error_description"}, what
        assert r.json()["error"] == error, (what, r.text)
        assert secret not in r.text and r.json()["error_description"], what
    # The SDK surfaces the error as it parses it (governance §4.2).
    bad = WorkspaceClient(host=gw.url, client_id=cid, client_secret="dose" + "0" * 64)
    with pytest.raises(Exception, match="invalid_client"):
        list(bad.serving_endpoints.list())


def test_tampered_and_foreign_tokens(gw: Server) -> None:
    sp = new_sp(gw)
    tok = access_token(gw, sp["applicationId"], new_secret(gw, sp["id"])["secret"])
    head, payload, sig = tok.split(".")
    flip = {"A": "B"}.get(sig[len(sig) // 2], "A")
    claims = jwt.decode(tok, options={"verify_signature": False})
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwt.get_unverified_header(tok)["kid"]
    longer = dict(claims, exp=claims["exp"] + 86400)
    forged = [
        ".".join((head, payload, sig[:len(sig) // 2] + flip + sig[len(sig) // 2 + 1:])),
        ".".join((head, base64.urlsafe_b64encode(json.dumps(longer).encode()).decode()
                  .rstrip("="), sig)),
        jwt.encode(claims, other, algorithm="RS256", headers={"kid": kid}),
        jwt.encode(claims, other, algorithm="RS256"),
        jwt.encode(claims, "guess" * 8, algorithm="HS256", headers={"kid": kid}),
        jwt.encode(claims, None, algorithm="none", headers={"kid": kid}),  # type: ignore[arg-type]
    ]
    assert status_with(gw, tok) == 200
    for bad in forged:
        r = httpx.get(gw.url + LIST, headers={"Authorization": f"Bearer {bad}"})
        assert (r.status_code, r.json()["error_code"]) == (401, "UNAUTHENTICATED"), bad
    assert status_with(gw, tok) == 200


def test_deleted_secret_revokes_its_tokens(gw: Server) -> None:
    sp = new_sp(gw)
    cid = sp["applicationId"]
    gone, kept = new_secret(gw, sp["id"]), new_secret(gw, sp["id"])
    tok, other = access_token(gw, cid, gone["secret"]), access_token(gw, cid, kept["secret"])
    admin = WorkspaceClient(host=gw.url, token=gw.token)
    admin.service_principal_secrets_proxy.delete(sp["id"], gone["id"])
    assert status_with(gw, tok) == 401  # the very next request
    r = token_request(gw, {"grant_type": "client_credentials"}, (cid, gone["secret"]))
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
    assert status_with(gw, other) == 200  # the other secret's token lives on


def test_expired_secret_mints_nothing(gw: Server) -> None:
    sp = new_sp(gw)
    cid, sec = sp["applicationId"], new_secret(gw, sp["id"], lifetime="2s")
    r = token_request(gw, {"grant_type": "client_credentials"}, (cid, sec["secret"]))
    assert r.status_code == 200 and 1 <= r.json()["expires_in"] <= 2  # not past the secret
    ISSUED.append(r.json()["access_token"])
    time.sleep(2.5)
    r2 = token_request(gw, {"grant_type": "client_credentials"}, (cid, sec["secret"]))
    assert (r2.status_code, r2.json()["error"]) == (401, "invalid_client")
    assert status_with(gw, r.json()["access_token"]) == 401
    admin = WorkspaceClient(host=gw.url, token=gw.token)
    listed = {s.id: s for s in admin.service_principal_secrets_proxy.list(sp["id"])}
    assert listed[sec["id"]].status == "EXPIRED"


def test_inactive_or_deleted_sp_loses_its_tokens(gw: Server) -> None:
    sp = new_sp(gw)
    cid, secret = sp["applicationId"], new_secret(gw, sp["id"])["secret"]
    tok = access_token(gw, cid, secret)
    admin = WorkspaceClient(host=gw.url, token=gw.token)
    assert status_with(gw, tok) == 200
    with gw.client() as c:
        r = c.patch(f"{SCIM}/ServicePrincipals/{sp['id']}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "path": "active", "value": False}]})
        assert r.status_code == 200, r.text
    assert status_with(gw, tok) == 401
    r = token_request(gw, {"grant_type": "client_credentials"}, (cid, secret))
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
    sp2 = new_sp(gw)
    tok2 = access_token(gw, sp2["applicationId"], new_secret(gw, sp2["id"])["secret"])
    admin.service_principals.delete(sp2["id"])
    assert status_with(gw, tok2) == 401


# -- the secrets API ---------------------------------------------------------------------
def test_secrets_proxy_through_the_sdk(gw: Server) -> None:
    admin = WorkspaceClient(host=gw.url, token=gw.token)
    api = admin.service_principal_secrets_proxy
    sp = new_sp(gw)
    made = api.create(sp["id"], lifetime="3600s")
    assert made.secret and made.secret.startswith("dose") and made.id and made.secret_hash
    ISSUED.append(made.secret)
    assert made.status == "ACTIVE" and made.scopes is None
    assert made.create_time and made.expire_time and made.update_time == made.create_time
    t0, t1 = (time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ"))
              for t in (made.create_time, made.expire_time))
    assert t1 - t0 == 3600
    assert abs(time.mktime(time.gmtime()) - t0) < 60  # UTC
    by_app = api.create(sp["applicationId"], scopes=["all-apis"])  # applicationId works too
    ISSUED.append(by_app.secret or "")
    assert by_app.scopes == ["all-apis"]
    more = [api.create(sp["id"]) for _ in range(3)]
    ISSUED.extend(m.secret or "" for m in more)
    ids = [str(m.id) for m in more]
    with gw.client() as c:
        page = c.get(SECRETS.format(sp["id"]), params={"page_size": 2}).json()
        assert len(page["secrets"]) == 2 and page["next_page_token"]
        assert "secret" not in page["secrets"][0]
        bad_page = c.get(SECRETS.format(sp["id"]), params={"page_token": "nope"})
        assert bad_page.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    listed = [s.id for s in api.list(sp["id"], page_size=2)]  # the SDK's loop ends
    assert listed == [made.id, by_app.id, *ids]
    api.delete(sp["id"], ids[0])
    assert ids[0] not in {s.id for s in api.list(sp["id"])}
    with pytest.raises(NotFound):
        api.delete(sp["id"], ids[0])
    with pytest.raises(NotFound):
        list(api.list("1234567890123456"))
    for bad in ({"lifetime": "3600"}, {"lifetime": "0s"}, {"lifetime": "-5s"},
                {"lifetime": "99999999999s"}, {"lifetime": 3600}, {"scopes": ["sql"]},
                {"scopes": "all-apis"}, {"scopes": ["openid"]}):
        with pytest.raises(InvalidParameterValue):
            api.create(sp["id"], **bad)
    assert len(list(api.list(sp["id"]))) == 4  # no failed create stored anything
    # Service principals are not admins: their own token cannot mint themselves secrets.
    w = WorkspaceClient(host=gw.url, client_id=sp["applicationId"], client_secret=made.secret)
    with pytest.raises(PermissionDenied):
        w.service_principal_secrets_proxy.create(sp["id"])
    with pytest.raises(PermissionDenied):
        list(w.service_principal_secrets_proxy.list(sp["id"]))


def test_cli(gw: Server) -> None:
    sp = new_sp(gw)
    env = {"DATABRICKS_HOST": gw.url, "DATABRICKS_TOKEN": gw.token, "PATH": "/usr/bin:/bin",
           "HOME": str(gw.data_dir), "COLUMNS": "160"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*fmserve_cmd(), "service-principals", "secrets", *args],
                              env=env, capture_output=True, text=True, timeout=60)

    made = run("create", sp["applicationId"], "--lifetime-seconds", "600")
    assert made.returncode == 0, made.stderr
    cid, secret = made.stdout.strip().splitlines()
    ISSUED.append(secret)
    assert cid == sp["applicationId"] and secret.startswith("dose")
    assert "shown only once" in made.stderr and secret not in made.stderr
    assert access_token(gw, cid, secret)
    listed = run("list", sp["id"], "--json")
    assert listed.returncode == 0, listed.stderr
    (info,) = json.loads(listed.stdout)
    assert info["status"] == "ACTIVE" and secret not in listed.stdout
    table = run("list", sp["displayName"])
    assert table.returncode == 0 and info["id"] in table.stdout
    assert run("delete", sp["applicationId"], info["id"]).returncode == 0
    assert json.loads(run("list", sp["id"], "--json").stdout) == []
    missing = run("delete", sp["id"], info["id"])
    assert missing.returncode == 1 and "RESOURCE_DOES_NOT_EXIST" in missing.stderr
    nobody = run("list", "no-such-sp")
    assert nobody.returncode == 1 and "No service principal" in nobody.stderr


def test_no_secret_or_token_in_the_logs(gw: Server, server: Server) -> None:
    """Last: every secret and token issued above, looked for in both servers' logs."""
    if not ISSUED:
        pytest.skip("run with the rest of the module")
    logs = gw.log() + server.log()
    leaked = [v[:12] + "…" for v in ISSUED if v and v in logs]
    assert not leaked
