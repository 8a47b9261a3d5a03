"""No blocking store call on the event loop (issue 19, item 4).

The app runs in-process (ASGI transport, on the test's own event loop) over SQLite and
PostgreSQL. A gate wraps the database's session factory: every store call entering it
records its thread and then *waits until the test releases it*. The test releases it
only after a ``GET /health`` has been answered meanwhile, so a store call made on the
event loop could never be released (the loop would be stuck in the wait): it times out
and the test fails. Also: the per-request credential re-check reads no database, and a
secret changed or deleted through the API takes effect at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from test_persistence import pg_url  # noqa: F401 - the PostgreSQL fixture

from fmserve.api.app import create_app
from fmserve.config import ServerConfig
from fmserve.errors import InvalidParameterValue
from fmserve.store.db import Database, open_database
from fmserve.store.principals import PrincipalStore
from fmserve.store.tokens import TokenStore

GATE_TIMEOUT_S = 10.0


class Gate:
    """Wraps ``Database.session``: while armed, each call waits for :meth:`release`."""

    def __init__(self, db: Database) -> None:
        self._session = db.session
        self.armed = False
        self.entered = threading.Event()
        self.released = threading.Event()
        self.threads: list[int] = []
        self.timed_out = False
        db.session = self  # type: ignore[method-assign]

    def __call__(self) -> Any:
        if self.armed:
            self.threads.append(threading.get_ident())
            self.entered.set()
            if not self.released.wait(GATE_TIMEOUT_S):
                self.timed_out = True
        return self._session()

    def arm(self) -> None:
        self.armed, self.threads, self.timed_out = True, [], False
        self.entered.clear()
        self.released.clear()

    def release(self) -> None:
        self.released.set()
        self.armed = False


@pytest.fixture(params=["sqlite", "postgresql"])
def cfg(request: pytest.FixtureRequest, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerConfig]:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    # The module's tests share one PostgreSQL database, so one secrets key (it seals the
    # OAuth signing key stored there), as replicas on one database do.
    monkeypatch.setenv("FMSERVE_SECRETS_KEY", _KEY)
    yield ServerConfig(data_dir=tmp_path / "data", database_url=url, bundled=False,
                       sync_interval_s=3600)


_KEY = Fernet.generate_key().decode()
Call = Callable[[], Awaitable[Any]]


async def _held(gate: Gate, client: httpx.AsyncClient, call: Call) -> Any:
    """Run ``call`` with the gate armed; answer a health request while its store call is
    held in the gate; then let it finish. Returns what ``call`` returned."""
    loop_thread = threading.get_ident()
    gate.arm()
    task = asyncio.ensure_future(call())
    while not gate.entered.is_set() and not task.done():
        await asyncio.sleep(0.005)
    assert gate.entered.is_set(), "the call made no store call"
    health = await client.get("/health")  # the loop is free while the store call waits
    assert health.status_code == 200, health.text
    gate.release()
    out = await task
    assert not gate.timed_out, "a store call blocked the event loop"
    assert gate.threads and loop_thread not in gate.threads
    return out


Main = Callable[[httpx.AsyncClient, Any, Gate], Awaitable[None]]


async def _with(cfg: ServerConfig, main: Main) -> None:
    """Run ``main(client, app state, gate)`` against the app, lifespan and all."""
    db = open_database(cfg)
    admin, _ = PrincipalStore(db).ensure_builtins(cfg.admin_user)
    token, _ = TokenStore(db).create(owner_id=admin, comment="test")
    db.close()
    app = create_app(cfg)
    async with app.router.lifespan_context(app):
        fm = app.state.fm
        gate = Gate(fm.db)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://fmserve",
                                     headers={"Authorization": f"Bearer {token}"}) as client:
            assert (await client.get("/api/2.0/secrets/scopes/list")).status_code == 200
            await main(client, fm, gate)


def _external(key_ref: str) -> dict[str, Any]:
    return {"served_entities": [{"external_model": {
        "provider": "openai", "name": "gpt-4o-mini", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": key_ref,
                          "openai_api_base": "http://127.0.0.1:9/v1"}}}]}


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_store_calls_run_off_the_loop(cfg: ServerConfig) -> None:
    async def main(client: httpx.AsyncClient, fm: Any, gate: Gate) -> None:
        sec = "/api/2.0/secrets"
        ep = "/api/2.0/serving-endpoints"
        for path, body in ((f"{sec}/scopes/create", {"scope": "s"}),
                           (f"{sec}/put", {"scope": "s", "key": "k", "string_value": "v1"})):
            _ok(await _held(gate, client, lambda p=path, b=body: client.post(p, json=b)))
        listed = _ok(await _held(gate, client, lambda: client.get(f"{sec}/list",
                                                                  params={"scope": "s"})))
        assert [m["key"] for m in listed["secrets"]] == ["k"]
        _ok(await _held(gate, client, lambda: client.get(f"{sec}/scopes/list")))

        created = _ok(await _held(gate, client, lambda: client.post(
            ep, json={"name": "off-loop", "config": _external("{{secrets/s/k}}")})))
        assert created["name"] == "off-loop"
        _ok(await _held(gate, client, lambda: client.put(
            f"{ep}/off-loop/config", json=_external("{{secrets/s/k}}"))))
        tags = _ok(await _held(gate, client, lambda: client.patch(
            f"{ep}/off-loop/tags", json={"add_tags": [{"key": "team", "value": "a"}]})))
        assert tags["tags"] == [{"key": "team", "value": "a"}]
        _ok(await _held(gate, client, lambda: client.put(
            f"{ep}/off-loop/rate-limits",
            json={"rate_limits": [{"calls": 5, "renewal_period": "minute"}]})))
        _ok(await _held(gate, client, lambda: client.put(
            f"{ep}/off-loop/ai-gateway", json={"usage_tracking_config": {"enabled": True}})))
        await _held(gate, client, fm.manager.sync)  # the periodic sync
        _ok(await _held(gate, client, lambda: client.delete(f"{ep}/off-loop")))
        _ok(await _held(gate, client, lambda: client.post(
            f"{sec}/delete", json={"scope": "s", "key": "k"})))
        _ok(await _held(gate, client, lambda: client.post(
            f"{sec}/scopes/delete", json={"scope": "s"})))

    asyncio.run(_with(cfg, main))


def test_secret_recheck_reads_memory_and_api_writes_apply_at_once(cfg: ServerConfig) -> None:
    async def main(client: httpx.AsyncClient, fm: Any, gate: Gate) -> None:
        sec = "/api/2.0/secrets"
        _ok(await client.post(f"{sec}/scopes/create", json={"scope": "r"}))
        _ok(await client.post(f"{sec}/put", json={"scope": "r", "key": "k",
                                                  "string_value": "old"}))
        gate.arm()  # from here any store call would be recorded
        assert fm.secrets.resolve("{{secrets/r/k}}") == "old"
        assert gate.threads == []
        gate.release()

        _ok(await client.post(f"{sec}/put", json={"scope": "r", "key": "k",
                                                  "string_value": "new"}))
        assert fm.secrets.resolve("Bearer {{secrets/r/k}}") == "Bearer new"
        _ok(await client.post(f"{sec}/delete", json={"scope": "r", "key": "k"}))
        with pytest.raises(InvalidParameterValue, match="does not exist"):
            fm.secrets.resolve("{{secrets/r/k}}")

        # A secret another process wrote is seen after the next sync.
        _ok(await client.post(f"{sec}/put", json={"scope": "r", "key": "k2",
                                                  "string_value": "x"}))
        other = Database(fm.db.url)
        try:
            from fmserve.store.secrets import SecretStore, load_key
            await asyncio.to_thread(SecretStore(other, load_key(fm.config.data_dir)).put,
                                    "r", "k2", "from-elsewhere")
        finally:
            other.close()
        assert fm.secrets.resolve("{{secrets/r/k2}}") == "x"
        await fm.manager.sync()
        assert fm.secrets.resolve("{{secrets/r/k2}}") == "from-elsewhere"
        _ok(await client.post(f"{sec}/scopes/delete", json={"scope": "r"}))
        with pytest.raises(InvalidParameterValue):
            fm.secrets.resolve("{{secrets/r/k2}}")

    asyncio.run(_with(cfg, main))


def test_concurrent_tag_patches_all_land(cfg: ServerConfig) -> None:
    async def main(client: httpx.AsyncClient, fm: Any, gate: Gate) -> None:
        ep = "/api/2.0/serving-endpoints"
        _ok(await client.post(f"{ep}", json={
            "name": "tags", "config": _external("plain-key-123")}))
        await asyncio.gather(*(client.patch(f"{ep}/tags/tags", json={
            "add_tags": [{"key": f"k{i}", "value": str(i)}]}) for i in range(8)))
        got = _ok(await client.get(f"{ep}/tags"))
        assert sorted(t["key"] for t in got["tags"]) == [f"k{i}" for i in range(8)]
        rec = await asyncio.to_thread(fm.manager.store.get, "tags")
        assert sorted(t["key"] for t in rec.tags) == [f"k{i}" for i in range(8)]
        _ok(await client.delete(f"{ep}/tags"))

    asyncio.run(_with(cfg, main))


def test_identity_calls_run_off_the_loop(cfg: ServerConfig) -> None:
    """SCIM, permissions, service-principal secrets and the token endpoint make their store
    calls in worker threads; authenticating a seen PAT or an OAuth token reads none."""
    async def main(client: httpx.AsyncClient, fm: Any, gate: Gate) -> None:
        scim = "/api/2.0/preview/scim/v2"
        user = await _held(gate, client, lambda: client.post(
            f"{scim}/Users", json={"userName": "off@example.com"}))
        assert user.status_code == 201, user.text
        sp = await _held(gate, client, lambda: client.post(
            f"{scim}/ServicePrincipals", json={"displayName": "off-bot"}))
        assert sp.status_code == 201, sp.text
        group = await _held(gate, client, lambda: client.post(
            f"{scim}/Groups", json={"displayName": "off-g",
                                    "members": [{"value": user.json()["id"]}]}))
        assert group.status_code == 201, group.text
        patched = await _held(gate, client, lambda: client.patch(
            f"{scim}/Groups/{group.json()['id']}", json={"Operations": [
                {"op": "add", "path": "members", "value": [{"value": sp.json()["id"]}]}]}))
        assert patched.status_code in (200, 204), patched.text
        sid = sp.json()["id"]
        secret = _ok(await _held(gate, client, lambda: client.post(
            f"/api/2.0/accounts/servicePrincipals/{sid}/credentials/secrets", json={})))
        minted = await _held(gate, client, lambda: client.post(
            "/oidc/v1/token", data={"grant_type": "client_credentials", "scope": "all-apis"},
            auth=(sp.json()["applicationId"], secret["secret"])))
        assert minted.status_code == 200, minted.text
        # Authenticating reads no database: a PAT seen before, and an OAuth access token.
        gate.arm()
        listed = await client.get("/api/2.0/serving-endpoints")
        oauth = await client.get("/api/2.0/serving-endpoints", headers={
            "Authorization": f"Bearer {minted.json()['access_token']}"})
        assert gate.threads == [], "authentication read the database"
        gate.release()
        assert listed.status_code == 200 and oauth.status_code == 200, oauth.text

    asyncio.run(_with(cfg, main))
