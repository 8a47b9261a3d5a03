"""The workspace SCIM API (governance spec §4.3) through the real databricks-sdk
(``w.users``, ``w.service_principals``, ``w.groups``, ``w.current_user``) and raw HTTP,
against a real ``fmserve serve --no-bundled`` on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Server, gateway_server
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import BadRequest, NotFound, PermissionDenied, ResourceConflict
from databricks.sdk.service import iam

from fmserve.config import ServerConfig
from fmserve.store.db import open_database
from fmserve.store.tokens import TokenStore

SCIM = "/api/2.0/preview/scim/v2"
PATCH = [iam.PatchSchema.URN_IETF_PARAMS_SCIM_API_MESSAGES_2_0_PATCH_OP]
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-scim-") as s:
        yield s


@pytest.fixture()
def w(srv: Server) -> WorkspaceClient:
    return WorkspaceClient(host=srv.url, token=srv.token)


@pytest.fixture()
def http(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


def tag() -> str:
    return uuid.uuid4().hex[:8]


def pat(srv: Server, owner_id: str) -> str:
    """A PAT for ``owner_id``, made in the server's database (the server's
    Authenticator reads the same one)."""
    db = open_database(ServerConfig(data_dir=srv.data_dir))
    try:
        return TokenStore(db).create(owner_id=owner_id, comment="test")[0]
    finally:
        db.close()


def as_(srv: Server, owner_id: str) -> WorkspaceClient:
    return WorkspaceClient(host=srv.url, token=pat(srv, owner_id))


def everything(http: httpx.Client) -> dict[str, Any]:
    """Every resource of every type, as the server lists them."""
    return {t: http.get(f"{SCIM}/{t}").json()["Resources"]
            for t in ("Users", "ServicePrincipals", "Groups")}


def scim_error(r: httpx.Response, status: int, scim_type: str | None) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["schemas"] == [ERROR_SCHEMA] and body["status"] == str(status)
    assert body.get("scimType") == scim_type, body
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def builtin(w: WorkspaceClient, name: str) -> iam.Group:
    [g] = list(w.groups.list(filter=f'displayName eq "{name}"'))
    return g


def test_users_crud_and_sdk_paging(w: WorkspaceClient, http: httpx.Client) -> None:
    t = tag()
    made = [w.users.create(user_name=f"u{i}-{t}@example.com", display_name=f"User {i} {t}")
            for i in range(5)]
    assert all(u.id and u.id.isdigit() for u in made)
    assert made[0].emails and made[0].emails[0].value == f"u0-{t}@example.com"
    assert [g.display for g in made[0].groups or []] == ["users"]
    # The SDK pages by startIndex with count=2 until a page is empty; each user once.
    seen = [u.id for u in w.users.list(count=2)]
    assert len(seen) == len(set(seen))
    assert {u.id for u in made} <= set(seen)
    total = http.get(f"{SCIM}/Users").json()["totalResults"]
    assert len(seen) == total
    page = http.get(f"{SCIM}/Users", params={"startIndex": 2, "count": 2}).json()
    assert page["startIndex"] == 2 and page["itemsPerPage"] == 2
    assert [r["id"] for r in page["Resources"]] == seen[1:3]
    past = http.get(f"{SCIM}/Users", params={"startIndex": total + 1, "count": 2}).json()
    assert past["Resources"] == [] and past["totalResults"] == total

    u = made[0]
    got = w.users.get(u.id)
    assert got.user_name == u.user_name and got.display_name == f"User 0 {t}"
    w.users.patch(u.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.REPLACE, path="displayName", value=f"Renamed {t}"),
        iam.Patch(op=iam.PatchOp.ADD, path="entitlements",
                  value=[{"value": "databricks-sql-access"}])])
    got = w.users.get(u.id)
    assert got.display_name == f"Renamed {t}"
    assert [e.value for e in got.entitlements or []] == ["databricks-sql-access"]
    w.users.update(u.id, user_name=u.user_name, display_name=f"Put {t}", active=False,
                   name=iam.Name(given_name="Ada", family_name="L"))
    got = w.users.get(u.id)
    assert (got.display_name, got.active) == (f"Put {t}", False)
    assert got.name and (got.name.given_name, got.name.family_name) == ("Ada", "L")
    assert not got.entitlements  # PUT replaced them
    assert [g.display for g in got.groups or []] == ["users"]  # memberships kept
    # projection
    slim = http.get(f"{SCIM}/Users/{u.id}", params={"attributes": "userName"}).json()
    assert set(slim) == {"id", "userName", "schemas"}
    w.users.delete(u.id)
    with pytest.raises(NotFound):
        w.users.get(u.id)
    assert u.id not in {x.id for x in w.users.list()}


def test_list_filters_and_sort(w: WorkspaceClient) -> None:
    t = tag()
    a = w.users.create(user_name=f"alpha-{t}@example.com", display_name=f"Alpha {t} Ops")
    b = w.users.create(user_name=f"beta-{t}@example.com", display_name=f"Beta {t} Ops")
    c = w.users.create(user_name=f"gamma-{t}@corp.io", display_name=f"Gamma {t} Dev")

    def ids(flt: str, **kw: Any) -> list[str | None]:
        return [u.id for u in w.users.list(filter=flt, **kw)]

    assert ids(f'userName eq "{a.user_name}"') == [a.id]
    assert ids(f'userName eq "{a.user_name.upper()}"') == [a.id]  # type: ignore[union-attr]
    assert set(ids(f'displayName co "{t} Ops"')) == {a.id, b.id}
    assert set(ids(f'userName sw "gamma-{t}"')) == {c.id}
    assert set(ids(f'displayName co "{t}" and userName co "@example.com"')) == {a.id, b.id}
    assert set(ids(f'userName eq "{a.user_name}" or userName eq "{c.user_name}"')) == \
        {a.id, c.id}
    assert set(ids(f'displayName co "{t}" and displayName ne "Beta {t} Ops"')) == {a.id, c.id}
    assert ids(f'displayName co "{t}"', sort_by="userName",
               sort_order=iam.ListSortOrder.DESCENDING) == [c.id, b.id, a.id]
    trimmed = list(w.users.list(filter=f'displayName co "{t}"', attributes="userName"))
    assert trimmed and all(u.display_name is None and u.user_name for u in trimmed)
    assert ids('userName eq "nobody-at-all@example.com"') == []


def test_service_principals(srv: Server, w: WorkspaceClient, http: httpx.Client) -> None:
    t = tag()
    sp = w.service_principals.create(display_name=f"robot {t}")
    assert sp.id and sp.application_id
    assert str(uuid.UUID(sp.application_id)) == sp.application_id
    assert sp.active is True
    given = str(uuid.uuid4())
    sp2 = w.service_principals.create(display_name=f"robot2 {t}", application_id=given)
    assert sp2.application_id == given
    found = list(w.service_principals.list(filter=f'applicationId eq "{given}"'))
    assert [s.id for s in found] == [sp2.id]
    w.service_principals.update(sp.id, application_id=sp.application_id,
                                display_name=f"robot renamed {t}")
    assert w.service_principals.get(sp.id).display_name == f"robot renamed {t}"
    before = everything(http)
    with pytest.raises(ResourceConflict):
        w.service_principals.create(display_name="dup", application_id=given)
    r = http.post(f"{SCIM}/ServicePrincipals",
                  json={"displayName": "x", "applicationId": "not-a-uuid"})
    scim_error(r, 400, "invalidValue")
    r = http.put(f"{SCIM}/ServicePrincipals/{sp.id}",
                 json={"applicationId": str(uuid.uuid4()), "displayName": "x"})
    scim_error(r, 400, "mutability")
    assert everything(http) == before
    # A service principal's own token: Me answers it as a User named by applicationId.
    me = as_(srv, sp.id).current_user.me()
    assert (me.id, me.user_name, me.display_name) == (sp.id, sp.application_id,
                                                       f"robot renamed {t}")
    w.service_principals.delete(sp2.id)
    with pytest.raises(NotFound):
        w.service_principals.get(sp2.id)


def test_admin_by_group_membership(srv: Server, w: WorkspaceClient) -> None:
    t = tag()
    u = w.users.create(user_name=f"carol-{t}@example.com", display_name="Carol")
    assert u.id
    carol = as_(srv, u.id)
    me = carol.current_user.me()
    assert (me.id, me.user_name) == (u.id, u.user_name)
    assert [g.display for g in me.groups or []] == ["users"]
    admin_me = w.current_user.me()
    assert admin_me.user_name == "admin@fmserve.local"
    assert "admins" in {g.display for g in admin_me.groups or []}
    # A non-admin reads but does not write.
    assert u.id in {x.id for x in carol.users.list()}
    assert carol.users.get(u.id).user_name == u.user_name
    assert carol.groups.get(builtin(carol, "admins").id or "").display_name == "admins"
    with pytest.raises(PermissionDenied):
        carol.users.create(user_name=f"nope-{t}@example.com")
    with pytest.raises(PermissionDenied):
        carol.users.patch(u.id, schemas=PATCH, operations=[
            iam.Patch(op=iam.PatchOp.REPLACE, path="displayName", value="x")])
    with pytest.raises(PermissionDenied):
        carol.users.delete(u.id)
    with pytest.raises(PermissionDenied):
        carol.groups.create(display_name=f"g-{t}")
    assert w.users.get(u.id).display_name == "Carol"
    assert not list(w.users.list(filter=f'userName eq "nope-{t}@example.com"'))

    admins = builtin(w, "admins")
    assert admins.id
    w.groups.patch(admins.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.ADD, value={"members": [{"value": u.id}]})])
    assert "admins" in {g.display for g in carol.current_user.me().groups or []}
    made = carol.users.create(user_name=f"by-carol-{t}@example.com")
    assert made.id
    w.groups.patch(admins.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.REMOVE, path=f'members[value eq "{u.id}"]')])
    with pytest.raises(PermissionDenied):
        carol.users.create(user_name=f"again-{t}@example.com")
    # Membership written from the user's side works the same way.
    w.users.patch(u.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.ADD, path="groups", value=[{"value": admins.id}])])
    assert u.id in {m.value for m in w.groups.get(admins.id).members or []}
    carol.users.delete(made.id)
    w.users.patch(u.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.REMOVE, path=f'groups[value eq "{admins.id}"]')])
    with pytest.raises(PermissionDenied):
        carol.users.delete(u.id)


def test_groups_members_and_nesting(w: WorkspaceClient, http: httpx.Client) -> None:
    t = tag()
    u1 = w.users.create(user_name=f"m1-{t}@example.com", display_name=f"M1 {t}")
    u2 = w.users.create(user_name=f"m2-{t}@example.com")
    sp = w.service_principals.create(display_name=f"bot {t}")
    g = w.groups.create(display_name=f"eng-{t}", members=[iam.ComplexValue(value=u1.id)])
    assert g.id and [m.value for m in g.members or []] == [u1.id]
    assert g.members and g.members[0].display == f"M1 {t}"
    assert g.members[0].ref == f"Users/{u1.id}"
    raw = http.get(f"{SCIM}/Groups/{g.id}").json()
    assert raw["meta"] == {"resourceType": "WorkspaceGroup"}
    w.groups.patch(g.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.ADD, path="members",
                  value=[{"value": u2.id}, {"value": sp.id}])])
    assert {m.value for m in w.groups.get(g.id).members or []} == {u1.id, u2.id, sp.id}
    assert f"eng-{t}" in {x.display for x in w.users.get(u2.id).groups or []}
    w.groups.patch(g.id, schemas=PATCH, operations=[
        iam.Patch(op=iam.PatchOp.REMOVE, path=f'members[value eq "{u1.id}"]')])
    assert {m.value for m in w.groups.get(g.id).members or []} == {u2.id, sp.id}
    # Nested groups: parent ⊃ g; the child lists its parent under groups.
    parent = w.groups.create(display_name=f"all-eng-{t}",
                             members=[iam.ComplexValue(value=g.id)])
    assert [x.value for x in w.groups.get(g.id).groups or []] == [parent.id]
    r = http.patch(f"{SCIM}/Groups/{g.id}", json={"Operations": [
        {"op": "add", "path": "members", "value": [{"value": parent.id}]}]})
    assert "cannot contain" in scim_error(r, 400, "invalidValue")
    # Filters on groups, rename, PUT, delete.
    assert [x.id for x in w.groups.list(filter=f'displayName eq "eng-{t}"')] == [g.id]
    in_groups = {x.display_name for x in w.groups.list(filter=f'members.value eq "{sp.id}"')}
    assert in_groups == {f"eng-{t}", "users"}
    w.groups.update(g.id, display_name=f"platform-{t}")
    after = w.groups.get(g.id)
    assert after.display_name == f"platform-{t}"
    assert {m.value for m in after.members or []} == {u2.id, sp.id}  # PUT kept members
    r = http.post(f"{SCIM}/Groups", json={"displayName": f"PLATFORM-{t}"})
    scim_error(r, 409, "uniqueness")
    w.groups.delete(parent.id)
    assert not w.groups.get(g.id).groups
    w.groups.delete(g.id)
    with pytest.raises(NotFound):
        w.groups.get(g.id)
    assert not [x for x in w.users.get(u2.id).groups or [] if x.value == g.id]


def test_builtin_groups(w: WorkspaceClient, http: httpx.Client) -> None:
    admins, users = builtin(w, "admins"), builtin(w, "users")
    t = tag()
    u = w.users.create(user_name=f"plain-{t}@example.com")
    assert u.id in {m.value for m in w.groups.get(users.id or "").members or []}
    before = everything(http)
    for r, kind in (
            (http.delete(f"{SCIM}/Groups/{admins.id}"), "invalidValue"),
            (http.delete(f"{SCIM}/Groups/{users.id}"), "invalidValue"),
            (http.patch(f"{SCIM}/Groups/{users.id}", json={"Operations": [
                {"op": "remove", "path": f'members[value eq "{u.id}"]'}]}), "mutability"),
            (http.patch(f"{SCIM}/Groups/{admins.id}", json={"Operations": [
                {"op": "replace", "path": "displayName", "value": "bosses"}]}), "mutability"),
            # The only admin user cannot leave admins, be deactivated or deleted.
            (http.patch(f"{SCIM}/Groups/{admins.id}", json={"Operations": [
                {"op": "replace", "path": "members", "value": []}]}), "invalidValue"),
            (http.patch(f"{SCIM}/Users/{w.current_user.me().id}", json={"Operations": [
                {"op": "replace", "path": "active", "value": False}]}), "invalidValue"),
            (http.delete(f"{SCIM}/Users/{w.current_user.me().id}"), "invalidValue")):
        scim_error(r, 400, kind)
    assert everything(http) == before
    # A user's groups written without 'users' keep it (membership is automatic).
    w.users.update(u.id, user_name=u.user_name, groups=[])
    assert [g.display for g in w.users.get(u.id).groups or []] == ["users"]


def test_bad_inputs_change_nothing(w: WorkspaceClient, http: httpx.Client) -> None:
    t = tag()
    u = w.users.create(user_name=f"dave-{t}@example.com", display_name="Dave")
    g = w.groups.create(display_name=f"team-{t}")
    before = everything(http)
    scim_error(http.get(f"{SCIM}/Users", params={"filter": 'userName eq'}), 400,
               "invalidFilter")
    scim_error(http.get(f"{SCIM}/Users", params={"filter": 'userName xx "a"'}), 400,
               "invalidFilter")
    with pytest.raises(BadRequest):
        list(w.users.list(filter="(userName eq"))
    scim_error(http.patch(f"{SCIM}/Users/{u.id}", json={
        "schemas": [iam.PatchSchema.URN_IETF_PARAMS_SCIM_API_MESSAGES_2_0_PATCH_OP.value],
        "Operations": [{"op": "move", "path": "displayName", "value": "x"}]}),
        400, "invalidSyntax")
    scim_error(http.patch(f"{SCIM}/Users/{u.id}", json={"Operations": [
        {"op": "replace", "path": "displayName", "value": "ok"},
        {"op": "replace", "path": "userName", "value": "other@example.com"}]}),
        400, "mutability")
    detail = scim_error(http.patch(f"{SCIM}/Groups/{g.id}", json={"Operations": [
        {"op": "add", "path": "members", "value": [{"value": u.id}, {"value": "12345"}]}]}),
        400, "invalidValue")
    assert "12345" in detail
    scim_error(http.post(f"{SCIM}/Groups", json={"displayName": f"t2-{t}",
                                                 "members": [{"value": "999"}]}),
               400, "invalidValue")
    scim_error(http.post(f"{SCIM}/Users", json={"userName": u.user_name.upper()}),  # type: ignore[union-attr]
               409, "uniqueness")
    with pytest.raises(ResourceConflict):
        w.users.create(user_name=u.user_name)
    scim_error(http.post(f"{SCIM}/Users", json={"displayName": "no userName"}), 400,
               "invalidValue")
    scim_error(http.post(f"{SCIM}/Users", content=b'{"userName": ',
                         headers={"content-type": "application/scim+json"}),
               400, "invalidSyntax")
    scim_error(http.post(f"{SCIM}/Users", json=["not", "an", "object"]), 400, "invalidSyntax")
    scim_error(http.put(f"{SCIM}/Users/{u.id}", json={"userName": f"x-{t}@example.com"}),
               400, "mutability")
    scim_error(http.get(f"{SCIM}/Users", params={"startIndex": "one"}), 400, "invalidValue")
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        r = http.request(method, f"{SCIM}/Users/0000000000000000",
                         json={"Operations": [{"op": "add", "path": "displayName",
                                               "value": "x"}]})
        scim_error(r, 404, None)
    with pytest.raises(NotFound):
        w.groups.get(u.id)  # a user id is not a group
    assert everything(http) == before
    # application/scim+json bodies are accepted.
    r = http.post(f"{SCIM}/Users", content=f'{{"userName": "scim-{t}@example.com"}}',
                  headers={"content-type": "application/scim+json"})
    assert r.status_code == 201 and r.json()["userName"] == f"scim-{t}@example.com"


def test_unauthenticated_is_401(srv: Server) -> None:
    r = httpx.get(f"{srv.url}{SCIM}/Me")
    assert r.status_code == 401
    r = httpx.get(f"{srv.url}{SCIM}/Users", headers={"Authorization": "Bearer dapi00"})
    assert r.status_code == 401
