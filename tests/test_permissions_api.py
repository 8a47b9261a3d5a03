"""The serving-endpoint permissions API through the real databricks-sdk (governance §4.6):
answer shape, PUT replaces / PATCH upserts / ``[]`` clears, bad input refused with nothing
changed, levels through groups, delegation by a manager, grants dying with their
endpoint, and the bundled pay-per-token endpoints.

The per-route permission matrix is in ``test_permissions.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import CHAT, Server, create_external, gateway_server
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import InvalidParameterValue, PermissionDenied
from databricks.sdk.service.serving import (
    ServingEndpointAccessControlRequest,
    ServingEndpointPermissionLevel,
)
from fakes.openai import external_model, fake
from fakes.server import FakeServer
from identities import Caller, new_group, new_sp, new_user, uid

PERMS = "/api/2.0/permissions/serving-endpoints"
SCIM = "/api/2.0/preview/scim/v2"
ADMINS_ENTRY = {"group_name": "admins", "display_name": "admins", "all_permissions": [
    {"permission_level": "CAN_MANAGE", "inherited": True,
     "inherited_from_object": ["/serving-endpoints/"]}]}


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-permapi-") as s:
        yield s


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    with fake() as f:
        yield f


@pytest.fixture()
def admin(srv: Server) -> WorkspaceClient:
    return WorkspaceClient(host=srv.url, token=srv.token)


def _grant(level: str, **who: str) -> ServingEndpointAccessControlRequest:
    return ServingEndpointAccessControlRequest(
        **who, permission_level=ServingEndpointPermissionLevel(level))


def _endpoint(srv: Server, upstream: FakeServer) -> tuple[str, str]:
    name = f"api-{uid()}"
    return name, create_external(srv, name, external_model(upstream.url))["id"]


def _direct(srv: Server, ep_id: str) -> dict[str, str]:
    """Direct grants on the wire: principal name → level."""
    with srv.client() as c:
        body = c.get(f"{PERMS}/{ep_id}").json()
    out = {}
    for e in body["access_control_list"]:
        name = e.get("user_name") or e.get("group_name") or e.get("service_principal_name")
        for p in e["all_permissions"]:
            if not p["inherited"]:
                out[name] = p["permission_level"]
    return out


def _level(who: Caller, name: str) -> str | None:
    with who.client() as c:
        r = c.get(f"/api/2.0/serving-endpoints/{name}")
    return r.json().get("permission_level") if r.status_code == 200 else None


def test_shape_put_patch_and_clear(srv: Server, admin: WorkspaceClient,
                                   upstream: FakeServer) -> None:
    name, ep_id = _endpoint(srv, upstream)
    user, sp = new_user(srv, "shape"), new_sp(srv)
    group = new_group(srv, [user.id], "shape")
    got = admin.serving_endpoints.set_permissions(ep_id, access_control_list=[
        _grant("CAN_QUERY", user_name=user.name),
        _grant("CAN_VIEW", group_name=group["displayName"]),
        _grant("CAN_MANAGE", service_principal_name=sp.name)])
    assert got.object_id == f"/serving-endpoints/{ep_id}"
    assert got.object_type == "serving-endpoint"
    wire = got.as_dict()["access_control_list"]
    assert wire == [
        {"user_name": user.name, "display_name": "User shape",
         "all_permissions": [{"permission_level": "CAN_QUERY", "inherited": False}]},
        ADMINS_ENTRY,
        {"group_name": group["displayName"], "display_name": group["displayName"],
         "all_permissions": [{"permission_level": "CAN_VIEW", "inherited": False}]},
        {"service_principal_name": sp.name,  # the applicationId
         "display_name": sp.display_name,
         "all_permissions": [{"permission_level": "CAN_MANAGE", "inherited": False}]}]
    assert admin.serving_endpoints.get_permissions(ep_id).as_dict() == got.as_dict()
    generic = admin.permissions.get("serving-endpoints", ep_id)  # w.permissions: same path
    assert generic.object_id == got.object_id and len(generic.access_control_list or []) == 4

    levels = admin.serving_endpoints.get_permission_levels(ep_id).permission_levels or []
    assert [lv.permission_level.value for lv in levels if lv.permission_level] == \
        ["CAN_MANAGE", "CAN_QUERY", "CAN_VIEW"]
    assert all(lv.description for lv in levels)

    # PATCH upserts the listed principal (names match case-insensitively)
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_MANAGE", user_name=user.name.upper())])
    assert _direct(srv, ep_id) == {user.name: "CAN_MANAGE", group["displayName"]: "CAN_VIEW",
                                   sp.name: "CAN_MANAGE"}
    # PUT replaces all direct grants
    admin.serving_endpoints.set_permissions(ep_id, access_control_list=[
        _grant("CAN_QUERY", group_name=group["displayName"])])
    assert _direct(srv, ep_id) == {group["displayName"]: "CAN_QUERY"}
    assert _level(user, name) == "CAN_QUERY"  # now through the group only
    # a principal listed twice gets the highest level listed
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_MANAGE", user_name=user.name), _grant("CAN_VIEW", user_name=user.name)])
    assert _direct(srv, ep_id)[user.name] == "CAN_MANAGE"
    # [] (and a body without the list) clear every direct grant; admins still manage
    cleared = admin.serving_endpoints.set_permissions(ep_id, access_control_list=[])
    assert cleared.as_dict()["access_control_list"] == [ADMINS_ENTRY]
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_VIEW", user_name=user.name)])
    with srv.client() as c:
        assert c.put(f"{PERMS}/{ep_id}", json={}).json()["access_control_list"] == \
            [ADMINS_ENTRY]
    assert _level(user, name) is None


BAD_BODIES: list[tuple[str, Any]] = [
    ("level IS_OWNER", {"access_control_list": [{"user_name": "{u}",
                                                 "permission_level": "IS_OWNER"}]}),
    ("lower-case level", {"access_control_list": [{"user_name": "{u}",
                                                   "permission_level": "can_query"}]}),
    ("no level", {"access_control_list": [{"user_name": "{u}"}]}),
    ("no principal", {"access_control_list": [{"permission_level": "CAN_VIEW"}]}),
    ("two principals", {"access_control_list": [
        {"user_name": "{u}", "group_name": "users", "permission_level": "CAN_VIEW"}]}),
    ("empty name", {"access_control_list": [{"user_name": "",
                                             "permission_level": "CAN_VIEW"}]}),
    ("name not a string", {"access_control_list": [{"user_name": 7,
                                                    "permission_level": "CAN_VIEW"}]}),
    ("unknown user", {"access_control_list": [{"user_name": "ghost@example.com",
                                               "permission_level": "CAN_VIEW"}]}),
    ("unknown group", {"access_control_list": [{"group_name": "ghosts",
                                                "permission_level": "CAN_VIEW"}]}),
    ("unknown SP", {"access_control_list": [{"service_principal_name": "0000-ghost",
                                             "permission_level": "CAN_VIEW"}]}),
    ("user name given as SP", {"access_control_list": [{"service_principal_name": "{u}",
                                                        "permission_level": "CAN_VIEW"}]}),
    ("list not a list", {"access_control_list": {"user_name": "{u}"}}),
    ("entry not an object", {"access_control_list": ["{u}"]}),
    ("good entry then a bad one", {"access_control_list": [
        {"user_name": "{u}", "permission_level": "CAN_MANAGE"},
        {"user_name": "{u}", "permission_level": "OWNER"}]}),
]


def _fill(obj: Any, user: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("{u}", user)
    if isinstance(obj, list):
        return [_fill(v, user) for v in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, user) for k, v in obj.items()}
    return obj


def test_bad_input_is_400_and_changes_nothing(srv: Server, admin: WorkspaceClient,
                                              upstream: FakeServer) -> None:
    name, ep_id = _endpoint(srv, upstream)
    user = new_user(srv, "bad")
    admin.serving_endpoints.set_permissions(ep_id, access_control_list=[
        _grant("CAN_VIEW", user_name=user.name)])
    before = _direct(srv, ep_id)
    with srv.client() as c:
        for what, body in BAD_BODIES:
            for method in ("PUT", "PATCH"):
                r = c.request(method, f"{PERMS}/{ep_id}", json=_fill(body, user.name))
                assert r.status_code == 400, (what, method, r.text)
                assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE", (what, r.text)
                assert _direct(srv, ep_id) == before, (what, method)
        r = c.put(f"{PERMS}/{ep_id}", content=b"[1]")
        assert r.status_code == 400 and _direct(srv, ep_id) == before
    with pytest.raises(InvalidParameterValue, match="ghost"):
        admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
            _grant("CAN_VIEW", user_name="ghost@example.com")])


def test_levels_through_groups_take_the_highest(srv: Server, admin: WorkspaceClient,
                                                upstream: FakeServer) -> None:
    name, ep_id = _endpoint(srv, upstream)
    user = new_user(srv, "grp")
    inner = new_group(srv, [user.id], "inner")
    outer = new_group(srv, [inner["id"]], "outer")  # nested: user ∈ inner ∈ outer
    admin.serving_endpoints.set_permissions(ep_id, access_control_list=[
        _grant("CAN_VIEW", group_name=inner["displayName"]),
        _grant("CAN_QUERY", user_name=user.name)])
    assert _level(user, name) == "CAN_QUERY"
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_MANAGE", group_name=outer["displayName"])])
    assert _level(user, name) == "CAN_MANAGE"
    with srv.client() as c:  # inner leaves outer: back to the direct CAN_QUERY
        r = c.patch(f"{SCIM}/Groups/{outer['id']}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "remove", "path": f'members[value eq "{inner["id"]}"]'}]})
        assert r.status_code in (200, 204), r.text
    assert _level(user, name) == "CAN_QUERY"
    with user.client() as c:
        r = c.patch(f"/api/2.0/serving-endpoints/{name}/tags", json={"add_tags": [
            {"key": "k", "value": "v"}]})
        assert r.status_code == 403 and "CAN_MANAGE" in r.json()["message"]


def test_manager_delegates_and_may_lock_itself_out(srv: Server, admin: WorkspaceClient,
                                                   upstream: FakeServer) -> None:
    manager, friend = new_user(srv, "mgr"), new_user(srv, "friend")
    name = f"own-{uid()}"
    with manager.client() as c:  # any principal may create; the creator manages it
        r = c.post("/api/2.0/serving-endpoints", json={"name": name, "config": {
            "served_entities": [{"external_model": external_model(upstream.url)}]}})
        assert r.status_code == 200, r.text
        ep_id = r.json()["id"]
    assert _direct(srv, ep_id) == {manager.name: "CAN_MANAGE"}
    mws = manager.ws()
    with pytest.raises(PermissionDenied, match="CAN_MANAGE"):
        friend.ws().serving_endpoints.update_permissions(ep_id, access_control_list=[
            _grant("CAN_MANAGE", user_name=friend.name)])
    mws.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_QUERY", user_name=friend.name)])
    assert _level(friend, name) == "CAN_QUERY"
    # Databricks lets a manager drop its own grant; admins can always repair it.
    mws.serving_endpoints.set_permissions(ep_id, access_control_list=[
        _grant("CAN_QUERY", user_name=friend.name)])
    assert _level(manager, name) is None
    with pytest.raises(PermissionDenied, match="CAN_VIEW"):
        mws.serving_endpoints.get_permissions(ep_id)
    admin.serving_endpoints.update_permissions(ep_id, access_control_list=[
        _grant("CAN_MANAGE", user_name=manager.name)])
    assert _level(manager, name) == "CAN_MANAGE"
    mws.serving_endpoints.delete(name)


def test_grants_die_with_their_endpoint(srv: Server, admin: WorkspaceClient,
                                        upstream: FakeServer) -> None:
    name, old_id = _endpoint(srv, upstream)
    user = new_user(srv, "gone")
    admin.serving_endpoints.set_permissions(old_id, access_control_list=[
        _grant("CAN_QUERY", user_name=user.name)])
    assert _level(user, name) == "CAN_QUERY"
    new_id = create_external(srv, name, external_model(upstream.url))["id"]  # delete + create
    assert new_id != old_id
    assert _direct(srv, new_id) == {"admin@fmserve.local": "CAN_MANAGE"}  # its creator only
    assert _level(user, name) is None
    with srv.client() as c:
        assert c.get(f"{PERMS}/{old_id}").status_code == 404
        c.delete(f"/api/2.0/serving-endpoints/{name}")


def test_bundled_endpoints(server: Server) -> None:
    """Pay-per-token endpoints: every principal may query them; nobody can change that."""
    admin = WorkspaceClient(host=server.url, token=server.token)
    ep = admin.serving_endpoints.get(CHAT)
    assert ep.id
    perms = admin.serving_endpoints.get_permissions(ep.id)
    assert perms.as_dict()["access_control_list"] == [
        {"group_name": "users", "display_name": "users", "all_permissions": [
            {"permission_level": "CAN_QUERY", "inherited": True,
             "inherited_from_object": ["/serving-endpoints/"]}]}]
    for change in (admin.serving_endpoints.set_permissions,
                   admin.serving_endpoints.update_permissions):
        with pytest.raises(InvalidParameterValue, match="pay-per-token"):
            change(ep.id, access_control_list=[_grant("CAN_MANAGE", group_name="admins")])
    assert admin.serving_endpoints.get_permissions(ep.id).as_dict() == perms.as_dict()

    user = new_user(server, "ppt")
    with user.client() as c:
        listed = {e["name"]: e for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]}
        assert listed[CHAT]["permission_level"] == "CAN_QUERY"
        assert CHAT in {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post(f"/serving-endpoints/{CHAT}/invocations",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        r = c.patch(f"/api/2.0/serving-endpoints/{CHAT}/tags", json={"add_tags": [
            {"key": "k", "value": "v"}]})
        assert r.status_code == 400
