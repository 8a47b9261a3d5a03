"""Secret-scope ACLs through the real databricks-sdk (``w.secrets.put_acl/get_acl/list_acls/
delete_acl``) and their enforcement on the secrets routes and on endpoint configs that
reference ``{{secrets/scope/key}}``.

One ``--no-bundled`` server for the module; principals made through SCIM, each with its
own PAT (``tests/identities.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Server, gateway_server, wait_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import (
    InvalidParameterValue,
    PermissionDenied,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
)
from databricks.sdk.service.serving import (
    ServingEndpointAccessControlRequest,
    ServingEndpointPermissionLevel,
)
from databricks.sdk.service.workspace import AclPermission
from fakes.openai import external_model, fake
from fakes.server import FakeServer
from identities import Caller, new_group, new_sp, new_user, uid

from fmserve.config import ServerConfig
from fmserve.store.db import open_database
from fmserve.store.secrets import SecretStore, load_key


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-acl-") as s:
        yield s


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    with fake() as f:
        yield f


@pytest.fixture()
def admin(srv: Server) -> WorkspaceClient:
    return WorkspaceClient(host=srv.url, token=srv.token)


def _acl(ws: WorkspaceClient, scope: str) -> dict[str, str]:
    return {a.principal: a.permission.value for a in ws.secrets.list_acls(scope)
            if a.permission is not None}


def test_creator_gets_manage_and_acl_api_roundtrip(srv: Server, admin: WorkspaceClient) -> None:
    alice, bob = new_user(srv, "alice"), new_user(srv, "bob")
    group = new_group(srv, [bob.id], "readers")
    sp = new_sp(srv)
    ws = alice.ws()
    scope = f"own-{uid()}"
    ws.secrets.create_scope(scope)  # any principal may create a scope
    assert _acl(ws, scope) == {alice.name: "MANAGE"}

    ws.secrets.put_acl(scope, group["displayName"], AclPermission.READ)
    ws.secrets.put_acl(scope, sp.name, AclPermission.WRITE)  # an SP by its applicationId
    ws.secrets.put_acl(scope, "users", AclPermission.READ)
    assert _acl(ws, scope) == {alice.name: "MANAGE", group["displayName"]: "READ",
                               sp.name: "WRITE", "users": "READ"}
    got = ws.secrets.get_acl(scope, sp.name)
    assert (got.principal, got.permission) == (sp.name, AclPermission.WRITE)
    # a name in another case is the same principal, stored as the principal spells it
    ws.secrets.put_acl(scope, group["displayName"].upper(), AclPermission.WRITE)
    assert _acl(ws, scope)[group["displayName"]] == "WRITE"
    assert ws.secrets.get_acl(scope, group["displayName"].upper()).permission == \
        AclPermission.WRITE
    ws.secrets.delete_acl(scope, "users")
    assert "users" not in _acl(ws, scope)
    with pytest.raises(ResourceDoesNotExist):
        ws.secrets.get_acl(scope, "users")
    with pytest.raises(ResourceDoesNotExist):
        ws.secrets.delete_acl(scope, "users")
    # admins manage every scope without an entry
    assert alice.name in _acl(admin, scope)
    admin.secrets.delete_scope(scope)


def test_permissions_enforced_on_secret_routes(srv: Server, admin: WorkspaceClient) -> None:
    owner, reader, writer, member, stranger = (new_user(srv, p) for p in (
        "owner", "reader", "writer", "member", "stranger"))
    group = new_group(srv, [member.id], "writers")
    scope = f"enf-{uid()}"
    owner.ws().secrets.create_scope(scope)
    owner.ws().secrets.put_secret(scope, "k1", string_value="v1")
    owner.ws().secrets.put_acl(scope, reader.name, AclPermission.READ)
    owner.ws().secrets.put_acl(scope, writer.name, AclPermission.WRITE)
    owner.ws().secrets.put_acl(scope, group["displayName"], AclPermission.WRITE)

    def status(who: Caller, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        with who.client() as c:
            r = c.request(method, f"/api/2.0/secrets/{path}", **kw)
        return r.status_code, r.json()

    put = ("POST", "put", {"json": {"scope": scope, "key": "k2", "string_value": "v2"}})
    delete = ("POST", "delete", {"json": {"scope": scope, "key": "k2"}})
    listing = ("GET", "list", {"params": {"scope": scope}})
    acls = ("GET", "acls/list", {"params": {"scope": scope}})
    put_acl = ("POST", "acls/put", {"json": {"scope": scope, "principal": stranger.name,
                                             "permission": "READ"}})
    # (caller, allowed?) for each route: READ < WRITE < MANAGE; the group grants WRITE
    table = [
        (listing, [(reader, True), (writer, True), (member, True), (owner, True),
                   (stranger, False)]),
        (put, [(reader, False), (writer, True), (member, True), (owner, True),
               (stranger, False)]),
        (delete, [(reader, False), (stranger, False), (writer, True)]),  # k2 is gone then
        (acls, [(reader, False), (writer, False), (member, False), (owner, True),
                (stranger, False)]),
    ]
    needed = {"list": "READ", "put": "WRITE", "delete": "WRITE", "acls/list": "MANAGE"}
    for (method, path, kw), cells in table:
        for who, allowed in cells:
            code, body = status(who, method, path, **kw)
            if allowed:
                assert code == 200, (path, who.name, body)
            else:
                assert code == 403, (path, who.name, body)
                assert body["error_code"] == "PERMISSION_DENIED"
                assert needed[path] in body["message"] and scope in body["message"]
                assert who.name in body["message"]
    assert status(writer, put_acl[0], put_acl[1], **put_acl[2])[0] == 403
    assert stranger.name not in _acl(admin, scope)  # the refused write changed nothing
    assert {m.key for m in reader.ws().secrets.list_secrets(scope)} == {"k1"}
    # every principal lists every scope, as on Databricks
    assert scope in {s.name for s in stranger.ws().secrets.list_scopes()}
    # unknown scopes are a 404 for everyone, before any 403
    for who in (stranger, owner):
        code, body = status(who, "GET", "list", params={"scope": f"nope-{uid()}"})
        assert code == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(PermissionDenied, match="MANAGE"):
        writer.ws().secrets.delete_scope(scope)
    # removing a member from the group takes its WRITE away
    with srv.client() as c:
        r = c.patch(f"/api/2.0/preview/scim/v2/Groups/{group['id']}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "remove", "path": f'members[value eq "{member.id}"]'}]})
        assert r.status_code in (200, 204), r.text
    assert status(member, put[0], put[1], **put[2])[0] == 403
    owner.ws().secrets.delete_scope(scope)


def test_initial_manage_principal_users(srv: Server) -> None:
    creator, other = new_user(srv, "creator"), new_user(srv, "other")
    scope = f"all-{uid()}"
    creator.ws().secrets.create_scope(scope, initial_manage_principal="users")
    assert _acl(creator.ws(), scope) == {"users": "MANAGE"}
    other.ws().secrets.put_secret(scope, "k", string_value="v")  # MANAGE through users
    other.ws().secrets.delete_scope(scope)
    with pytest.raises(InvalidParameterValue, match="users"):
        creator.ws().secrets.create_scope(f"x-{uid()}", initial_manage_principal=creator.name)


def test_acl_input_errors(srv: Server, admin: WorkspaceClient) -> None:
    scope = f"bad-{uid()}"
    admin.secrets.create_scope(scope)
    before = _acl(admin, scope)
    with srv.client() as c:
        for body in ({"scope": scope, "principal": "users", "permission": "read"},
                     {"scope": scope, "principal": "users", "permission": "OWNER"},
                     {"scope": scope, "principal": "users"},
                     {"scope": scope, "permission": "READ"},
                     {"principal": "users", "permission": "READ"},
                     {"scope": scope, "principal": 5, "permission": "READ"}):
            r = c.post("/api/2.0/secrets/acls/put", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        r = c.get("/api/2.0/secrets/acls/get", params={"scope": scope})
        assert r.status_code == 400
    with pytest.raises(ResourceDoesNotExist, match="nobody"):
        admin.secrets.put_acl(scope, f"nobody-{uid()}@example.com", AclPermission.READ)
    missing = f"missing-{uid()}"
    for call in (lambda: admin.secrets.put_acl(missing, "users", AclPermission.READ),
                 lambda: list(admin.secrets.list_acls(missing)),
                 lambda: admin.secrets.get_acl(missing, "users"),
                 lambda: admin.secrets.delete_acl(missing, "users")):
        with pytest.raises(ResourceDoesNotExist, match=missing):
            call()
    assert _acl(admin, scope) == before
    admin.secrets.delete_scope(scope)


def test_scope_delete_drops_acls_and_old_scopes_are_admin_only(srv: Server,
                                                                admin: WorkspaceClient) -> None:
    user = new_user(srv, "recreate")
    scope = f"re-{uid()}"
    admin.secrets.create_scope(scope)
    admin.secrets.put_acl(scope, user.name, AclPermission.MANAGE)
    user.ws().secrets.put_secret(scope, "k", string_value="v")
    admin.secrets.delete_scope(scope)
    # a new scope of the same name starts with its creator's entry only
    admin.secrets.create_scope(scope)
    assert _acl(admin, scope) == {"admin@fmserve.local": "MANAGE"}
    with pytest.raises(PermissionDenied):
        user.ws().secrets.put_secret(scope, "k", string_value="v")
    admin.secrets.delete_scope(scope)

    # a scope made outside the API (the CLI's store call, or before ACLs existed): no
    # entries, so admins only
    legacy = f"legacy-{uid()}"
    db = open_database(ServerConfig(data_dir=srv.data_dir, database_url=None))
    try:
        SecretStore(db, load_key(srv.data_dir)).create_scope(legacy)
    finally:
        db.close()
    assert _acl(admin, legacy) == {}
    with pytest.raises(PermissionDenied, match=legacy):
        list(user.ws().secrets.list_secrets(legacy))
    admin.secrets.put_secret(legacy, "k", string_value="v")
    with pytest.raises(ResourceAlreadyExists):
        user.ws().secrets.create_scope(legacy)
    admin.secrets.delete_scope(legacy)


def _ref_config(upstream: FakeServer, scope: str) -> dict[str, Any]:
    model = external_model(upstream.url)
    model["openai_config"] = {"openai_api_key": f"{{{{secrets/{scope}/openai}}}}",
                              "openai_api_base": f"{upstream.url}/v1"}
    return {"served_entities": [{"name": "gpt", "external_model": model}]}


def test_endpoint_config_needs_read_on_referenced_scope(srv: Server, admin: WorkspaceClient,
                                                        upstream: FakeServer) -> None:
    """A user who manages nothing but has READ on scope ``s`` can create an endpoint whose
    config references ``{{secrets/s/k}}``; one without READ gets 403 naming the scope and
    nothing is stored."""
    scope = f"ref-{uid()}"
    admin.secrets.create_scope(scope)
    admin.secrets.put_secret(scope, "openai", string_value=f"sk-{uid()}")
    reader, outsider = new_user(srv, "refreader"), new_user(srv, "outsider")
    admin.secrets.put_acl(scope, reader.name, AclPermission.READ)

    denied = f"acl-denied-{uid()}"
    with outsider.client() as c:
        r = c.post("/api/2.0/serving-endpoints",
                   json={"name": denied, "config": _ref_config(upstream, scope)})
    assert r.status_code == 403, r.text
    assert r.json()["error_code"] == "PERMISSION_DENIED"
    assert scope in r.json()["message"] and "READ" in r.json()["message"]
    with srv.client() as c:
        assert c.get(f"/api/2.0/serving-endpoints/{denied}").status_code == 404
        assert denied not in {e["name"] for e in c.get("/api/2.0/serving-endpoints").json()
                              .get("endpoints", [])}

    name = f"acl-ok-{uid()}"
    with reader.client() as c:
        r = c.post("/api/2.0/serving-endpoints",
                   json={"name": name, "config": _ref_config(upstream, scope)})
        assert r.status_code == 200, r.text
        assert r.json()["permission_level"] == "CAN_MANAGE"  # the creator manages it
        wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]["ready"]
                 == "READY", timeout_s=30, what="endpoint READY")
        q = c.post(f"/serving-endpoints/{name}/invocations",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert q.status_code == 200, q.text
    # the outsider, granted CAN_MANAGE on the endpoint, still may not store a config that
    # references the scope
    with srv.client() as c:
        ep_id = c.get(f"/api/2.0/serving-endpoints/{name}").json()["id"]
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant(outsider.name, "CAN_MANAGE")])
    with outsider.client() as c:
        r = c.put(f"/api/2.0/serving-endpoints/{name}/config", json=_ref_config(upstream, scope))
        assert r.status_code == 403 and scope in r.json()["message"], r.text
        assert c.get(f"/api/2.0/serving-endpoints/{name}").json()["config"][
            "config_version"] == 1
    with srv.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")
    admin.secrets.delete_scope(scope)


def _grant(user_name: str, level: str) -> ServingEndpointAccessControlRequest:
    return ServingEndpointAccessControlRequest(
        user_name=user_name, permission_level=ServingEndpointPermissionLevel(level))
