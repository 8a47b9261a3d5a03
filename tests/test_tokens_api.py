"""Personal access tokens and token management through databricks-sdk, on a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, gateway_server, wait_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound, PermissionDenied
from identities import new_sp, new_user


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-tok-") as s:
        yield s


def status(url: str, token: str) -> int:
    return httpx.get(f"{url}/api/2.0/serving-endpoints", timeout=30,
                     headers={"Authorization": f"Bearer {token}"}).status_code


def test_create_list_delete(srv: Server) -> None:
    u = new_user(srv)
    w = u.ws()
    made = w.tokens.create(comment="laptop", lifetime_seconds=3600)
    assert made.token_value and made.token_value.startswith("dapi")
    info = made.token_info
    assert info is not None and info.comment == "laptop" and info.token_id
    assert info.expiry_time is not None and info.creation_time is not None
    assert info.expiry_time - info.creation_time == 3600 * 1000
    assert status(srv.url, made.token_value) == 200
    listed = {t.token_id: t for t in w.tokens.list()}
    assert info.token_id in listed and listed[info.token_id].comment == "laptop"
    # The list is the caller's own: the admin's tokens are not there.
    assert all(t.token_id != info.token_id for t in srv_ws(srv).tokens.list())
    w.tokens.delete(token_id=info.token_id)
    assert status(srv.url, made.token_value) == 401  # at once
    assert info.token_id not in {t.token_id for t in w.tokens.list()}
    with pytest.raises(NotFound):
        w.tokens.delete(token_id=info.token_id)
    default = w.tokens.create(comment="no lifetime").token_info
    assert default is not None and default.expiry_time is not None and \
        default.creation_time is not None
    two_years = default.expiry_time - default.creation_time
    assert abs(two_years - 2 * 365 * 86400 * 1000) < 5000


def srv_ws(srv: Server) -> WorkspaceClient:
    return WorkspaceClient(host=srv.url, token=srv.token)


def test_expiry(srv: Server) -> None:
    u = new_user(srv)
    short = u.ws().tokens.create(comment="short", lifetime_seconds=2).token_value
    assert short and status(srv.url, short) == 200
    wait_for(lambda: status(srv.url, short) == 401, 15, "the token to expire")


def test_cannot_touch_others_tokens(srv: Server) -> None:
    a, b = new_user(srv), new_user(srv)
    mine = a.ws().tokens.create(comment="a").token_info
    assert mine is not None and mine.token_id
    with pytest.raises(NotFound):
        b.ws().tokens.delete(token_id=mine.token_id)
    with pytest.raises(PermissionDenied):
        list(b.ws().token_management.list())
    with pytest.raises(PermissionDenied):
        b.ws().token_management.delete(token_id=mine.token_id)


def test_token_management_and_obo(srv: Server) -> None:
    w = srv_ws(srv)
    sp = new_sp(srv)
    obo = w.token_management.create_obo_token(application_id=sp.name, comment="etl",
                                              lifetime_seconds=600)
    assert obo.token_value and obo.token_info is not None
    info = obo.token_info
    assert info.owner_id == int(sp.id) and info.created_by_username == "admin@fmserve.local"
    me = httpx.get(f"{srv.url}/api/2.0/preview/scim/v2/Me", timeout=30,
                   headers={"Authorization": f"Bearer {obo.token_value}"}).json()
    assert me["id"] == sp.id  # the token authenticates as the service principal
    assert info.token_id in {t.token_id for t in w.token_management.list()}
    by_creator = list(w.token_management.list(created_by_username="admin@fmserve.local"))
    assert info.token_id in {t.token_id for t in by_creator}
    got = w.token_management.get(token_id=info.token_id).token_info
    assert got is not None and got.comment == "etl" and got.workspace_id
    w.token_management.delete(token_id=info.token_id)
    assert status(srv.url, obo.token_value) == 401
    with pytest.raises(NotFound):
        w.token_management.get(token_id=info.token_id)
    with pytest.raises(NotFound):
        w.token_management.create_obo_token(application_id="00000000-0000-0000-0000-000000000000")


@pytest.mark.parametrize("path, body", [
    ("/api/2.0/token/create", {"lifetime_seconds": "3600"}),
    ("/api/2.0/token/create", {"lifetime_seconds": -1}),
    ("/api/2.0/token/create", {"lifetime_seconds": True}),
    ("/api/2.0/token/create", {"comment": 5}),
    ("/api/2.0/token/create", {"comment": "x" * 1025}),
    ("/api/2.0/token/create", {"scopes": ["sql"]}),
    ("/api/2.0/token/delete", {}),
    ("/api/2.0/token/delete", {"token_id": 7}),
    ("/api/2.0/token-management/on-behalf-of/tokens", {}),
])
def test_bad_input(srv: Server, path: str, body: dict[str, object]) -> None:
    with srv.client() as c:
        before = c.get("/api/2.0/token-management/tokens").json()["token_infos"]
        r = c.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE" and r.json()["message"]
        assert c.get("/api/2.0/token-management/tokens").json()["token_infos"] == before


def test_no_token_value_in_the_log(srv: Server) -> None:
    u = new_user(srv)
    values = [u.ws().tokens.create(comment=f"t{i}").token_value for i in range(3)]
    time.sleep(0.5)
    log = srv.log()
    assert values and all(v and v not in log for v in values)
