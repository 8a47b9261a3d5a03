"""The serving-endpoint permission matrix and the permissions API (governance §4.6).

One ``--no-bundled`` server and one external-model endpoint on the fake OpenAI. Callers:
for each level (none, CAN_VIEW, CAN_QUERY, CAN_MANAGE) a user with a direct grant, a user
who has it only through a group, and a service principal (its own PAT), plus the first
admin. Every management and query route is called by every caller (:data:`MATRIX`: route,
level needed, status when allowed) and must answer that status, or 403
``PERMISSION_DENIED`` naming the level and the endpoint; get and list show the caller's
``permission_level``; the listing routes show only what the caller may see. The
databricks-sdk makes the calls it has (get, list, query, the permissions API); httpx the
rest. The permissions API itself is tested further in ``test_permissions_api.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, create_external, start_server, stop_server, wait_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import DatabricksError, NotFound, PermissionDenied
from databricks.sdk.service.serving import (
    ChatMessage,
    ChatMessageRole,
    ServingEndpointAccessControlRequest,
    ServingEndpointPermissionLevel,
)
from fakes.openai import external_model, fake
from fakes.server import FakeServer
from identities import Caller, new_group, new_sp, new_user, uid

LEVELS = (None, "CAN_VIEW", "CAN_QUERY", "CAN_MANAGE")
RANK = {None: -1, "CAN_VIEW": 0, "CAN_QUERY": 1, "CAN_MANAGE": 2}
VIA = ("user", "group", "sp")
ENTITY = "gpt"
HI = [{"role": "user", "content": "hi"}]


@dataclass
class World:
    srv: Server
    upstream: FakeServer
    name: str
    ep_id: str
    acl: list[ServingEndpointAccessControlRequest]
    callers: dict[str, Caller] = field(default_factory=dict)
    level: dict[str, str | None] = field(default_factory=dict)
    entry: dict[str, dict[str, str]] = field(default_factory=dict)  # caller → ACL key/name
    clients: dict[str, WorkspaceClient] = field(default_factory=dict)

    def ws(self, who: str) -> WorkspaceClient:
        if who not in self.clients:
            self.clients[who] = self.callers[who].ws()
        return self.clients[who]

    def config(self) -> dict[str, Any]:
        return {"served_entities": [{"name": ENTITY,
                                     "external_model": external_model(self.upstream.url)}]}


def _request(entry: dict[str, str], level: str) -> ServingEndpointAccessControlRequest:
    return ServingEndpointAccessControlRequest(
        **entry, permission_level=ServingEndpointPermissionLevel(level))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-perm-"))
    srv = start_server(tmp, serve_args=("--no-bundled",))
    try:
        with fake() as upstream:
            name = f"perm-{uid()}"
            ep = create_external(srv, name, external_model(upstream.url), entity_name=ENTITY)
            w = World(srv, upstream, name, ep["id"], [])
            for level in LEVELS:
                for via in VIA:
                    key = f"{via}-{level or 'NONE'}"
                    if via == "sp":
                        c = new_sp(srv)
                        w.entry[key] = {"service_principal_name": c.name}
                    else:
                        c = new_user(srv, key.lower())
                        w.entry[key] = {"user_name": c.name}
                        if via == "group":
                            g = new_group(srv, [c.id], key.lower())
                            w.entry[key] = {"group_name": g["displayName"]}
                    w.callers[key], w.level[key] = c, level
                    if level:
                        w.acl.append(_request(w.entry[key], level))
            me = httpx.get(f"{srv.url}/api/2.0/preview/scim/v2/Me", headers=srv.headers).json()
            w.callers["admin"] = Caller(me["id"], "user", me["userName"], srv.token, srv.url)
            w.level["admin"] = "CAN_MANAGE"
            WorkspaceClient(host=srv.url, token=srv.token).serving_endpoints.set_permissions(
                w.ep_id, access_control_list=w.acl)
            yield w
    finally:
        stop_server(srv)
        shutil.rmtree(tmp, ignore_errors=True)


# -- one call per route: (status, body) --------------------------------------------------

Answer = tuple[int, Any]
Call = Callable[[World, str], Answer]


def _sdk(fn: Callable[[], Any]) -> Answer:
    try:
        return 200, fn()
    except DatabricksError as exc:
        status = 403 if isinstance(exc, PermissionDenied) else 404 \
            if isinstance(exc, NotFound) else 400
        return status, {"error_code": exc.error_code, "message": str(exc)}


def _http(method: str, path: str, body: Any = None) -> Call:
    def call(w: World, who: str) -> Answer:
        url = path.format(name=w.name, entity=ENTITY)
        with w.callers[who].client() as c:
            r = c.request(method, url, json=body(w, who) if callable(body) else body)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text
    return call


def _update_config(w: World, who: str) -> Answer:
    status, body = _http("PUT", "/api/2.0/serving-endpoints/{name}/config",
                         lambda w, _: w.config())(w, who)
    if status == 200:  # let the rollout finish before the next caller updates
        with w.srv.client() as c:
            wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{w.name}").json()["state"]
                     ["config_update"] == "NOT_UPDATING", timeout_s=30, what="rollout")
    return status, body


EP = "/api/2.0/serving-endpoints/{name}"
CHAT = {"messages": HI, "max_tokens": 5}

# (route id, level needed, status when allowed, call)
MATRIX: list[tuple[str, str, int, Call]] = [
    ("get", "CAN_VIEW", 200, lambda w, who: _sdk(lambda: w.ws(who).serving_endpoints.get(
        w.name))),
    ("metrics", "CAN_VIEW", 200, _http("GET", EP + "/metrics")),
    # An external model has no worker, so no log: 404 for the served model, after the check.
    ("logs", "CAN_VIEW", 404, _http("GET", EP + "/served-models/{entity}/logs")),
    ("build-logs", "CAN_VIEW", 404, _http("GET", EP + "/served-models/{entity}/build-logs")),
    ("openapi", "CAN_VIEW", 200, _http("GET", EP + "/openapi")),
    ("permissions-get", "CAN_VIEW", 200, lambda w, who: _sdk(
        lambda: w.ws(who).serving_endpoints.get_permissions(w.ep_id))),
    ("permission-levels", "CAN_VIEW", 200, lambda w, who: _sdk(
        lambda: w.ws(who).serving_endpoints.get_permission_levels(w.ep_id))),
    ("invocations", "CAN_QUERY", 200, lambda w, who: _sdk(
        lambda: w.ws(who).serving_endpoints.query(
            w.name, messages=[ChatMessage(role=ChatMessageRole.USER, content="hi")],
            max_tokens=5))),
    ("served-model-invocations", "CAN_QUERY", 200,
     _http("POST", "/serving-endpoints/{name}/served-models/{entity}/invocations", CHAT)),
    ("chat-completions", "CAN_QUERY", 200, _http(
        "POST", "/serving-endpoints/chat/completions", lambda w, _: {**CHAT, "model": w.name})),
    ("v1-chat-completions", "CAN_QUERY", 200, _http(
        "POST", "/v1/chat/completions", lambda w, _: {**CHAT, "model": w.name})),
    ("v1-completions", "CAN_QUERY", 200, _http(
        "POST", "/v1/completions", lambda w, _: {"model": w.name, "prompt": "hi",
                                                 "max_tokens": 5})),
    # A chat endpoint refuses embeddings, but only once the caller may query it.
    ("v1-embeddings", "CAN_QUERY", 400, _http(
        "POST", "/v1/embeddings", lambda w, _: {"model": w.name, "input": "hi"})),
    ("update-config", "CAN_MANAGE", 200, _update_config),
    ("tags", "CAN_MANAGE", 200, _http("PATCH", EP + "/tags", lambda w, who: {
        "add_tags": [{"key": f"by-{who}", "value": "1"}]})),
    ("ai-gateway", "CAN_MANAGE", 200, _http("PUT", EP + "/ai-gateway", {
        "usage_tracking_config": {"enabled": True}})),
    ("rate-limits", "CAN_MANAGE", 200, _http("PUT", EP + "/rate-limits", {"rate_limits": []})),
    # PUT the very ACL the fixture set and PATCH one entry of it: allowed calls change
    # nothing, so every other cell still sees the same grants.
    ("permissions-put", "CAN_MANAGE", 200, lambda w, who: _sdk(
        lambda: w.ws(who).serving_endpoints.set_permissions(
            w.ep_id, access_control_list=w.acl))),
    ("permissions-patch", "CAN_MANAGE", 200, lambda w, who: _sdk(
        lambda: w.ws(who).serving_endpoints.update_permissions(
            w.ep_id, access_control_list=w.acl[:1]))),
]
CALLERS = [f"{via}-{level or 'NONE'}" for level in LEVELS for via in VIA] + ["admin"]


@pytest.mark.parametrize("who", CALLERS)
@pytest.mark.parametrize(("route", "needed", "ok", "call"), MATRIX, ids=[m[0] for m in MATRIX])
def test_matrix(world: World, route: str, needed: str, ok: int, call: Call, who: str) -> None:
    status, body = call(world, who)
    if RANK[world.level[who]] >= RANK[needed]:
        assert status == ok, (route, who, status, body)
        if route == "get":
            assert body.permission_level.value == world.level[who]
        if route == "permissions-get":
            assert body.object_id == f"/serving-endpoints/{world.ep_id}"
    else:
        assert status == 403, (route, who, status, body)
        assert body["error_code"] == "PERMISSION_DENIED"
        assert needed in body["message"] and world.name in body["message"]
        assert world.callers[who].name in body["message"]


@pytest.mark.parametrize("who", CALLERS)
def test_listings_show_what_the_caller_may_see(world: World, who: str) -> None:
    level = world.level[who]
    # the SDK's list items (ServingEndpoint) carry no permission_level; the wire does
    listed = {e.name for e in world.ws(who).serving_endpoints.list()}
    assert (world.name in listed) == (level is not None)
    with world.callers[who].client() as c:
        raw = {e["name"]: e for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]}
        assert raw.get(world.name, {}).get("permission_level") == level
        for path in ("/v1/models", "/serving-endpoints/models"):
            r = c.get(path)
            assert r.status_code == 200
            assert (world.name in {m["id"] for m in r.json()["data"]}) == \
                (RANK[level] >= RANK["CAN_QUERY"]), (path, r.text)


@pytest.mark.parametrize("who", CALLERS)
def test_missing_endpoint_is_404_for_everyone(world: World, who: str) -> None:
    missing = f"nosuch-{uid()}"
    with world.callers[who].client() as c:
        for method, path, body in (
                ("GET", f"/api/2.0/serving-endpoints/{missing}", None),
                ("PUT", f"/api/2.0/serving-endpoints/{missing}/config", world.config()),
                ("DELETE", f"/api/2.0/serving-endpoints/{missing}", None),
                ("GET", f"/api/2.0/serving-endpoints/{missing}/metrics", None),
                ("POST", f"/serving-endpoints/{missing}/invocations", CHAT),
                ("POST", "/v1/chat/completions", {**CHAT, "model": missing}),
                ("GET", f"/api/2.0/permissions/serving-endpoints/{uid()}", None),
                ("PUT", f"/api/2.0/permissions/serving-endpoints/{uid()}",
                 {"access_control_list": []}),
                # the permissions API takes the id, not the name
                ("GET", f"/api/2.0/permissions/serving-endpoints/{world.name}", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST", r.text


@pytest.mark.parametrize("who", CALLERS)
def test_delete(world: World, who: str) -> None:
    """Last: each caller tries to delete a throwaway endpoint it holds its level on."""
    name = f"throwaway-{uid()}"
    ep = create_external(world.srv, name, external_model(world.upstream.url))
    admin = WorkspaceClient(host=world.srv.url, token=world.srv.token)
    level = world.level[who]
    if level and who != "admin":
        admin.serving_endpoints.set_permissions(
            ep["id"], access_control_list=[_request(world.entry[who], level)])
    status, body = _sdk(lambda: world.ws(who).serving_endpoints.delete(name))
    with world.srv.client() as c:
        left = c.get(f"/api/2.0/serving-endpoints/{name}").status_code
        if level == "CAN_MANAGE":
            assert status == 200 and left == 404, body
            # its grants went with it
            assert c.get(f"/api/2.0/permissions/serving-endpoints/{ep['id']}").status_code \
                == 404
        else:
            assert status == 403 and left == 200, body
            assert "CAN_MANAGE" in body["message"] and name in body["message"]
            c.delete(f"/api/2.0/serving-endpoints/{name}")
