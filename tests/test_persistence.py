"""Stored state: endpoints survive a restart; the stores on SQLite and PostgreSQL;
two server processes sharing one PostgreSQL database stay in step (manager sync).

PostgreSQL tests make a fresh database ``fmserve_test_<random>`` on the server at
``FMSERVE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``,
used only to create and drop it). They skip when none is reachable on a developer's
machine, and fail in CI (``CI=true``), where PostgreSQL always runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, postgres_database, start_server, stop_server, wait_for
from cryptography.fernet import Fernet
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import (
    AiGatewayUsageTrackingConfig,
    EndpointCoreConfigInput,
    EndpointTag,
    FallbackConfig,
    ServedEntityInput,
)

from fmserve.errors import ResourceAlreadyExists, ResourceDoesNotExist
from fmserve.store.db import Database
from fmserve.store.endpoints import EndpointStore
from fmserve.store.tokens import TokenStore

SMOL = "system.ai.smollm2-135m-instruct"
API = "/api/2.0/serving-endpoints"
WAIT = timedelta(minutes=3)
# One llama.cpp thread per worker: several servers' workers share a small machine.
SERVER_ENV = {"FMSERVE_LLAMA_THREADS": "1"}


# -- PostgreSQL: a throwaway database per module ----------------------------------------


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database("fmserve_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fmserve.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    database = Database(url)
    database.migrate()
    database.migrate()  # idempotent
    try:
        yield database
    finally:
        if request.param == "postgresql":  # the database is shared by the module: empty it
            with database.engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM serving_endpoints")
                conn.exec_driver_sql("DELETE FROM tokens")
        database.close()


def _config(*names: str) -> dict[str, Any]:
    return {"served_entities": [{"name": n, "entity_name": SMOL} for n in names]}


# -- stores -------------------------------------------------------------------------------


def test_endpoint_store_crud(db: Database) -> None:
    store = EndpointStore(db)
    assert store.all() == []
    assert store.get("e1") is None
    rec = store.create(name="e1", creator="alice@example.com", task="llm/v1/chat",
                       config=_config("a"), description="first",
                       tags=[{"key": "team", "value": "x"}],
                       ai_gateway={"usage_tracking_config": {"enabled": True}},
                       rate_limits=[{"calls": 5, "renewal_period": "minute"}])
    assert rec.config_version == 1
    assert rec.id and len(rec.id) == 32
    assert rec.creation_timestamp == rec.last_updated_timestamp > 1_600_000_000_000
    store.create(name="e0", creator="bob", task="llm/v1/embeddings", config=_config("b"))

    got = store.get("e1")
    assert got == rec
    assert got is not None and got.config == _config("a")
    assert got.tags == [{"key": "team", "value": "x"}]
    assert got.ai_gateway == {"usage_tracking_config": {"enabled": True}}
    assert got.rate_limits == [{"calls": 5, "renewal_period": "minute"}]
    assert [r.name for r in store.all()] == ["e0", "e1"]  # ordered by name
    assert store.get("e0").ai_gateway is None  # type: ignore[union-attr]

    time.sleep(0.01)
    up = store.update("e1", tags=[])
    assert up.config_version == 1 and up.tags == []
    assert up.last_updated_timestamp > rec.last_updated_timestamp
    up = store.update("e1", config=_config("a", "b"))
    assert up.config_version == 2 and up.config == _config("a", "b")
    up = store.update("e1", config=_config("c"), description="third")
    assert up.config_version == 3
    again = store.get("e1")
    assert again is not None
    assert (again.config_version, again.config, again.description) == (3, _config("c"), "third")
    assert again.id == rec.id and again.creation_timestamp == rec.creation_timestamp

    with pytest.raises(ResourceAlreadyExists, match="e1"):
        store.create(name="e1", creator="mallory", task="llm/v1/chat", config=_config("z"))
    assert store.get("e1") == again  # unchanged by the failed insert
    with pytest.raises(ResourceDoesNotExist, match="nope"):
        store.update("nope", tags=[])

    assert store.delete("e1") is True
    assert store.delete("e1") is False
    assert store.get("e1") is None
    assert [r.name for r in store.all()] == ["e0"]


def test_endpoint_store_shared_between_handles(db: Database) -> None:
    """Two Database objects on one URL (two processes) see each other's writes."""
    other = Database(db.url)
    try:
        EndpointStore(db).create(name="shared", creator="a", task="llm/v1/chat",
                                 config=_config("a"))
        rec = EndpointStore(other).get("shared")
        assert rec is not None and rec.config_version == 1
        EndpointStore(other).update("shared", config=_config("b"))
        rec = EndpointStore(db).get("shared")
        assert rec is not None and rec.config_version == 2 and rec.config == _config("b")
        with pytest.raises(ResourceAlreadyExists):
            EndpointStore(other).create(name="shared", creator="b", task="llm/v1/chat",
                                        config=_config("c"))
    finally:
        other.close()


def test_token_store(db: Database) -> None:
    tokens = TokenStore(db)
    assert tokens.count_active() == 0
    plain, info = tokens.create(comment="ci", owner_id="1234")
    assert plain.startswith("dapi") and len(plain) == 36
    assert (info.comment, info.owner_id, info.created_by_id, info.expiry_time, info.revoked) == \
        ("ci", "1234", "1234", -1, False)
    other, _ = tokens.create(comment="short", owner_id="1234", lifetime_s=3600)
    assert plain != other

    v = tokens.verify(plain)
    assert v is not None and v.token_id == info.token_id and v.owner_id == "1234"
    assert tokens.verify(plain + "x") is None
    assert tokens.verify("dapi" + "0" * 32) is None
    assert tokens.count_active() == 2
    assert [t.token_id for t in tokens.list()][0] == info.token_id
    with db.engine.connect() as conn:  # only the hash is stored
        stored = " ".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM tokens"))
    assert plain not in stored

    assert tokens.revoke(info.token_id) is True
    assert tokens.verify(plain) is None
    assert tokens.verify(other) is not None
    assert tokens.revoke("no-such-id") is False
    assert tokens.count_active() == 1

    expired, _ = tokens.create(owner_id="1234", lifetime_s=1)
    with db.session() as s, s.begin():  # age it past its expiry
        from fmserve.store.models import Token
        from fmserve.store.tokens import hash_token

        row = s.query(Token).filter(Token.token_hash == hash_token(expired)).one()
        row.expiry_time = int(time.time() * 1000) - 1000
    assert tokens.verify(expired) is None


def test_workspace_id_is_stable(db: Database) -> None:
    first = db.workspace_id()
    assert first.isdigit() and len(first) == 16
    assert db.workspace_id() == first


# -- servers ------------------------------------------------------------------------------



def _get(srv: Server, name: str) -> httpx.Response:
    with srv.client() as c:
        return c.get(f"{API}/{name}")


def _ready(srv: Server, name: str, version: int) -> dict[str, Any] | None:
    r = _get(srv, name)
    if r.status_code != 200:
        return None
    ep = r.json()
    ok = (ep["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
          and ep["config"]["config_version"] == version)
    return ep if ok else None


def _ask(srv: Server, name: str) -> httpx.Response:
    with srv.client() as c:
        return c.post(f"/serving-endpoints/{name}/invocations",
                      json={"prompt": "a", "max_tokens": 1})


def _names(srv: Server) -> set[str]:
    with srv.client() as c:
        return {e["name"] for e in c.get(API).json()["endpoints"]}


def test_endpoint_survives_restart(tmp_path: Path) -> None:
    name = "persist-me"
    srv = start_server(tmp_path, SERVER_ENV)
    try:
        ws = WorkspaceClient(host=srv.url, token=srv.token)
        ws.serving_endpoints.create_and_wait(
            name=name, config=EndpointCoreConfigInput(
                name=name, served_entities=[ServedEntityInput(name="first", entity_name=SMOL)]),
            tags=[EndpointTag(key="team", value="search")], timeout=WAIT)
        ep = ws.serving_endpoints.update_config_and_wait(
            name, served_entities=[ServedEntityInput(name="second", entity_name=SMOL)],
            timeout=WAIT)
        assert ep.config is not None and ep.config.config_version == 2
        ws.serving_endpoints.put_ai_gateway(
            name, usage_tracking_config=AiGatewayUsageTrackingConfig(enabled=True),
            fallback_config=FallbackConfig(enabled=False))
        before = _get(srv, name).json()
    finally:
        stop_server(srv)
    assert srv.proc.returncode is not None

    srv = start_server(tmp_path, SERVER_ENV)  # same data dir, new token
    try:
        first = _get(srv, name)  # known at once, loading in the background
        assert first.status_code == 200, first.text
        after = wait_for(lambda: _ready(srv, name, 2), 120, "restored endpoint READY")
        for key in ("id", "name", "creator", "creation_timestamp", "task", "tags",
                    "ai_gateway", "permission_level"):
            assert after.get(key) == before.get(key), key
        assert after["tags"] == [{"key": "team", "value": "search"}]
        assert after["ai_gateway"] == {"usage_tracking_config": {"enabled": True},
                                       "fallback_config": {"enabled": False}}
        assert [e["name"] for e in after["config"]["served_entities"]] == ["second"]
        assert after["config"]["traffic_config"] == before["config"]["traffic_config"]
        r = _ask(srv, name)
        assert r.status_code == 200, r.text
        assert r.headers["served-model-name"] == "second"
        # the restored endpoint can be changed and deleted as usual
        with srv.client() as c:
            assert c.delete(f"{API}/{name}").status_code == 200
    finally:
        stop_server(srv)

    srv = start_server(tmp_path, SERVER_ENV)  # and the delete persisted too
    try:
        assert _get(srv, name).status_code == 404
        assert name not in _names(srv)
    finally:
        stop_server(srv)


def test_two_servers_share_postgres(pg_url: str, tmp_path: Path) -> None:
    # Replicas on one database share one secrets key (it also seals the OAuth signing key).
    env = {**SERVER_ENV, "FMSERVE_DATABASE_URL": pg_url,
           "FMSERVE_SECRETS_KEY": Fernet.generate_key().decode()}
    a = start_server(tmp_path / "a", env)
    try:
        b = start_server(tmp_path / "b", env)
        try:
            _two_servers(a, b)
        finally:
            stop_server(b)
    finally:
        stop_server(a)


def _two_servers(a: Server, b: Server) -> None:
    name = "shared-ep"
    # one database: a token made for A is good on B, and the workspace id is one
    with httpx.Client(base_url=b.url, timeout=30,
                      headers={"Authorization": f"Bearer {a.token}"}) as c:
        assert c.get(API).status_code == 200
    wa = httpx.get(f"{a.url}/.well-known/databricks-config", timeout=10).json()
    wb = httpx.get(f"{b.url}/.well-known/databricks-config", timeout=10).json()
    assert wa["workspace_id"] == wb["workspace_id"]

    ws_a = WorkspaceClient(host=a.url, token=a.token)
    ws_a.serving_endpoints.create(name=name, config=EndpointCoreConfigInput(
        name=name, served_entities=[ServedEntityInput(name="one", entity_name=SMOL)]),
        tags=[EndpointTag(key="k", value="v")])
    wait_for(lambda: name in _names(b), 30, "endpoint created on A listed on B")
    ep_b = wait_for(lambda: _ready(b, name, 1), 120, "endpoint READY on B")
    ep_a = wait_for(lambda: _ready(a, name, 1), 120, "endpoint READY on A")
    assert ep_b["id"] == ep_a["id"] and ep_b["creator"] == ep_a["creator"]
    assert ep_b["tags"] == [{"key": "k", "value": "v"}]
    r = _ask(b, name)
    assert r.status_code == 200 and r.headers["served-model-name"] == "one", r.text

    # a name taken on A is taken on B
    with b.client() as c:
        r = c.post(API, json={"name": name, "config": {"served_entities": [
            {"name": "x", "entity_name": SMOL}]}})
    assert r.status_code == 409 and r.json()["error_code"] == "RESOURCE_ALREADY_EXISTS", r.text

    # changes made on B reach A: tags and a new config version
    with b.client() as c:
        assert c.patch(f"{API}/{name}/tags",
                       json={"add_tags": [{"key": "k2", "value": "v2"}]}).status_code == 200
        r = c.put(f"{API}/{name}/config",
                  json={"served_entities": [{"name": "two", "entity_name": SMOL}]})
        assert r.status_code == 200, r.text
    wait_for(lambda: {t["key"] for t in _get(a, name).json().get("tags", [])} == {"k", "k2"},
              30, "tags patched on B seen on A")
    ep_a = wait_for(lambda: _ready(a, name, 2), 120, "config version 2 on A")
    assert [e["name"] for e in ep_a["config"]["served_entities"]] == ["two"]
    r = _ask(a, name)
    assert r.status_code == 200 and r.headers["served-model-name"] == "two", r.text

    # deleting on A removes it from B
    with a.client() as c:
        assert c.delete(f"{API}/{name}").status_code == 200
    wait_for(lambda: name not in _names(b), 30, "endpoint deleted on A gone from B")
    assert _get(b, name).status_code == 404
    r = _ask(b, name)
    assert r.status_code == 404, r.text
