"""Usage tracking is durable before it is acknowledged (AI Gateway, governance §1.5, §2).

A real ``fmserve serve --no-bundled`` with one external-model endpoint (the fake OpenAI
upstream) that has ``usage_tracking_config.enabled`` and rate limits: one user with a
generous per-user default, one with a small limit of its own, so the load mixes 200,
400 (``temperature`` out of range), 429, streamed and not, native ``/invocations`` and
the OpenAI route. Every request carries a unique ``client_request_id`` in its body —
the client's key to its ``endpoint_usage`` row (the server sends no request id back).

Each case (one server's life):

1. **kill -9 mid-load**: 48 asyncio clients loop for ~2 s, and the server is SIGKILLed
   while they are running.
2. **restart** on the same data dir and port (the request log's directory is
   ``<data>/request-log/<host>-<port>``): every response the client received in full (a
   non-streamed body, or a stream up to ``data: [DONE]``) has exactly one row with its
   status, ``request_streaming``, requester, characters and the token counts of its
   ``usage``; requests cut by the kill may or may not have one; none has two.
3. **graceful stop**: N more concurrent requests, SIGINT, and — the server down, no
   restart — exactly N new rows with the right values (``test_rate_limits`` checks six
   sequential rows on a running server; this checks the shutdown path under load).

Cases: SQLite with ``FMSERVE_REQUEST_LOG_SYNC=fsync`` (the default), PostgreSQL with
``write`` (the page cache: survives a killed process, not a machine crash).

PostgreSQL cases make a fresh database per test on ``FMSERVE_TEST_POSTGRES_URL``
(default ``postgresql://postgres@127.0.0.1:5432/test``) and drop it after; they skip
when none is reachable, except in CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import create_external, postgres_database, wait_for
from fakes import openai as fake_openai
from fakes.server import FakeServer
from identities import Caller, scim_create, uid

from fmserve.config import ServerConfig
from fmserve.gateway.usage import UsageMaterializer
from fmserve.store.db import Database, open_database
from fmserve.store.principals import PrincipalStore
from fmserve.store.request_log import RequestLog, replica_name, replicas
from fmserve.store.tokens import TokenStore
from fmserve.store.usage import UsageStore
from fmserve.testing import LocalServer, fmserve_cmd, free_port, stop_server, wait_until_up

EP = "usage-durable"
THROTTLED_CALLS = 5  # the throttled user's own limit (calls per minute)
# (route, streamed, valid): native invocations and the OpenAI route, streamed or not;
# invalid = temperature 9 (a 400 from fmserve's own validation, before any upstream call).
KINDS = (("native", False, True), ("native", True, True), ("native", False, False),
         ("openai", True, True), ("openai", False, True), ("native", True, False))


# -- a server on a data dir and port of our choosing -------------------------------------


@dataclass
class Site:
    """One server's home: data dir, port, environment and database; the running server."""

    tmp: Path
    port: int
    env: dict[str, str]
    db_url: str | None
    token: str | None = None  # the first admin's
    srv: LocalServer | None = None

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    def start(self) -> LocalServer:
        """``fmserve serve --no-bundled --port <port>``; returns once /health answers 200.
        Before the first start, the first admin and a token of theirs are made in the
        store (what ``fmserve admin-token`` does)."""
        if self.token is None:
            db = self.db()
            try:
                admin_id, _ = PrincipalStore(db).ensure_builtins(self.config().admin_user)
                self.token = TokenStore(db).create(owner_id=admin_id, comment="durability")[0]
            finally:
                db.close()
        log_path = self.tmp / f"server-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [*fmserve_cmd(), "serve", "--no-bundled", "--port", str(self.port)],
                env=self.env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.srv = LocalServer(f"http://127.0.0.1:{self.port}", self.token, self.data_dir,
                               proc, log_path)
        return wait_until_up(self.srv, "/health", 60, "fmserve serve")

    def config(self) -> ServerConfig:
        return ServerConfig(data_dir=self.data_dir, database_url=self.db_url)

    def db(self) -> Database:
        return open_database(self.config())

    def rows(self) -> list[dict[str, Any]]:
        """Every ``endpoint_usage`` row of the endpoint, read from the store directly."""
        db = self.db()
        try:
            return UsageStore(db).usage(EP)
        finally:
            db.close()

    def caller(self, prefix: str) -> Caller:
        """A new SCIM user with a PAT minted in this site's database."""
        assert self.srv is not None
        name = f"{prefix}-{uid()}@example.com"
        rec = scim_create(self.srv, "Users", {"userName": name, "displayName": prefix})
        db = self.db()
        try:
            token, _ = TokenStore(db).create(owner_id=rec["id"], comment="durability")
        finally:
            db.close()
        return Caller(rec["id"], "user", name, token, self.srv.url)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_openai.fake() as server:
        yield server


@contextmanager
def _site(store: str, sync: str) -> Iterator[Site]:
    """A fresh data dir and port (and PostgreSQL database); the server stopped after."""
    if store == "postgresql":
        with postgres_database("fmserve_usage") as url, _site_on(url, sync) as site:
            yield site
    else:
        with _site_on(None, sync) as site:
            yield site


@contextmanager
def _site_on(db_url: str | None, sync: str) -> Iterator[Site]:
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-usage-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABRICKS_TOKEN", "FMSERVE_DATABASE_URL")}
    env.update(FMSERVE_HOME=str(tmp / "data"), FMSERVE_REQUEST_LOG_SYNC=sync)
    if db_url:
        env["FMSERVE_DATABASE_URL"] = db_url
    site = Site(tmp, free_port(), env, db_url)
    try:
        yield site
    finally:
        if site.srv is not None:
            stop_server(site.srv)
        shutil.rmtree(tmp, ignore_errors=True)


def _endpoint(site: Site, fake: FakeServer) -> tuple[Caller, Caller]:
    """The tracked endpoint; ``(free, throttled)`` users with CAN_QUERY on it."""
    srv = site.srv
    assert srv is not None
    ep = create_external(srv, EP, fake_openai.external_model(fake.url))
    free, throttled = site.caller("free"), site.caller("throttled")
    with srv.client() as c:
        r = c.put(f"/api/2.0/serving-endpoints/{EP}/ai-gateway", json={
            "usage_tracking_config": {"enabled": True},
            "rate_limits": [
                {"calls": 100_000, "key": "user", "renewal_period": "minute"},
                {"calls": THROTTLED_CALLS, "key": "user", "principal": throttled.name,
                 "renewal_period": "minute"}]})
        assert r.status_code == 200, r.text
        r = c.put(f"/api/2.0/permissions/serving-endpoints/{ep['id']}", json={
            "access_control_list": [{"user_name": u.name, "permission_level": "CAN_QUERY"}
                                    for u in (free, throttled)]})
        assert r.status_code == 200, r.text
    return free, throttled


def _rows_covering(site: Site, cids: set[str]) -> list[dict[str, Any]]:
    """The endpoint's rows once there is one for each of ``cids`` (waits up to 15 s)."""
    def covered() -> list[dict[str, Any]] | None:
        got = site.rows()
        return got if {r["client_request_id"] for r in got} >= cids else None
    return wait_for(covered, 15, "usage rows of every acknowledged request")  # type: ignore[no-any-return]


# -- the client side: what was sent, what came back in full ------------------------------


@dataclass(frozen=True)
class Sent:
    cid: str  # client_request_id
    requester: str
    streamed: bool
    prompt: str


@dataclass(frozen=True)
class Done:
    """A response received in full: status, the answer's ``usage`` (200s) and the
    characters of its content (a stream's deltas added up)."""

    status: int
    usage: dict[str, Any] | None
    output_chars: int


@dataclass
class Ledger:
    sent: dict[str, Sent] = field(default_factory=dict)
    done: dict[str, Done] = field(default_factory=dict)
    transport_errors: int = 0


def _content_chars(chunk: dict[str, Any]) -> int:
    n = 0
    for choice in chunk.get("choices") or []:
        msg = choice.get("message") or choice.get("delta") or {}
        content = msg.get("content")
        n += len(content) if isinstance(content, str) else 0
    return n


async def _one(c: httpx.AsyncClient, kind: tuple[str, bool, bool], sent: Sent,
               auth: dict[str, str]) -> Done | None:
    """Send one request; its :class:`Done`, or None when a stream ended without
    ``[DONE]``. Raises httpx.TransportError when the connection fails or breaks."""
    route, streamed, valid = kind
    body: dict[str, Any] = {"messages": [{"role": "user", "content": sent.prompt}],
                            "max_tokens": 16, "client_request_id": sent.cid}
    if streamed:
        body["stream"] = True
    if not valid:
        body["temperature"] = 9
    path = f"/serving-endpoints/{EP}/invocations"
    if route == "openai":
        path, body["model"] = "/serving-endpoints/chat/completions", EP
    if not streamed:
        r = await c.post(path, json=body, headers=auth)
        out = r.json()
        return Done(r.status_code, out.get("usage") if r.status_code == 200 else None,
                    _content_chars(out) if r.status_code == 200 else 0)
    async with c.stream("POST", path, json=body, headers=auth) as r:
        if r.status_code != 200:
            await r.aread()
            return Done(r.status_code, None, 0)
        usage, chars = None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return Done(200, usage, chars)
            chunk = orjson.loads(line[6:])
            assert "error" not in chunk, chunk
            usage = chunk.get("usage") or usage
            chars += _content_chars(chunk)
    return None


async def _client(c: httpx.AsyncClient, who: Caller, idx: int, ledger: Ledger,
                  deadline: float, max_requests: int | None = None) -> None:
    """One client: requests one after another (kinds in turn) as ``who`` until
    ``deadline``, ``max_requests`` or the first broken connection (the server is gone).
    Clients share ``c``'s connection pool (one connection each when it has enough)."""
    auth = {"Authorization": f"Bearer {who.token}"}
    n = 0
    while time.monotonic() < deadline and (max_requests is None or n < max_requests):
        kind = KINDS[(idx + n) % len(KINDS)]
        n += 1
        cid = f"c{idx}-{n}-{uuid.uuid4().hex[:12]}"
        sent = Sent(cid, who.name, kind[1], f"hello {cid} " + "x" * ((idx * 7 + n) % 41))
        ledger.sent[cid] = sent
        try:
            done = await _one(c, kind, sent, auth)
        except httpx.TransportError:
            ledger.transport_errors += 1
            return
        if done is not None:
            ledger.done[cid] = done


async def _run_clients(url: str, plan: list[tuple[Caller, int]], ledger: Ledger,
                       duration_s: float, max_requests: int | None = None) -> None:
    """The clients of ``plan`` (caller, index) concurrently, on one pool."""
    limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=len(plan))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(_client(c, who, i, ledger, deadline, max_requests)
                               for who, i in plan))


def _check_row(row: dict[str, Any], sent: Sent, done: Done) -> None:
    """The row says what the client saw: status, streaming, requester and, for a 200,
    the tokens of the answer's ``usage`` and the characters it received."""
    what = (sent.cid, row, done)
    assert row["status_code"] == done.status, what
    assert row["request_streaming"] is sent.streamed, what
    assert row["requester"] == sent.requester and row["endpoint_name"] == EP, what
    assert len(row["databricks_request_id"]) == 32, what
    if done.status == 200:
        assert done.usage, what
        assert row["input_token_count"] == done.usage["prompt_tokens"] > 0, what
        assert row["output_token_count"] == done.usage["completion_tokens"] > 0, what
        assert row["output_character_count"] == done.output_chars > 0, what
        assert row["served_entity_id"] and len(row["served_entity_id"]) == 32, what
    else:
        assert done.status in (400, 429), what
        assert row["output_token_count"] == 0 and not row["served_entity_id"], what
    if done.status != 400:  # a 400 at validation is recorded before the body is measured
        assert row["input_character_count"] == len(sent.prompt), what


def _check_ledger(rows: list[dict[str, Any]], ledger: Ledger) -> dict[str, dict[str, Any]]:
    """No request has two rows, no row is of a request never sent, and every completed
    response has its row with the right values. Returns the rows by client_request_id."""
    dupes = {cid: n for cid, n in Counter(r["client_request_id"] for r in rows).items()
             if n > 1}
    assert not dupes, f"requests with more than one usage row: {dupes}"
    by_cid = {r["client_request_id"]: r for r in rows}
    assert set(by_cid) <= set(ledger.sent), set(by_cid) - set(ledger.sent)
    missing = [cid for cid in ledger.done if cid not in by_cid]
    assert not missing, f"{len(missing)} acknowledged requests have no usage row: {missing[:5]}"
    for cid, done in ledger.done.items():
        _check_row(by_cid[cid], ledger.sent[cid], done)
    return by_cid


# -- the test -------------------------------------------------------------------------------


# Each store and each sync policy once (the log does not depend on the store, nor the
# materialisation on the sync policy): two server lives, not four, keep the module short.
@pytest.mark.parametrize("store, sync", [("sqlite", "fsync"), ("postgresql", "write")])
def test_usage_rows_survive_kill_9_and_graceful_stop(fake: FakeServer, store: str,
                                                     sync: str) -> None:
    with _site(store, sync) as site:
        srv = site.start()
        free, throttled = _endpoint(site, fake)

        # 1. 48 clients (8 of them throttled); SIGKILL once the load is well under way.
        ledger = Ledger()

        async def load_then_kill() -> float:
            """Returns how long the load ran before the kill (s)."""
            plan = [(throttled if i % 6 == 0 else free, i) for i in range(48)]
            clients = asyncio.ensure_future(_run_clients(srv.url, plan, ledger, 8))
            started = time.monotonic()
            while time.monotonic() - started < 2 or (len(ledger.done) < 60 and
                                                     time.monotonic() - started < 5):
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGKILL)
            killed_after = time.monotonic() - started
            await clients
            return killed_after

        killed_after = asyncio.run(load_then_kill())
        assert srv.proc.wait(timeout=10) == -signal.SIGKILL
        codes = Counter(d.status for d in ledger.done.values())
        streamed_ok = sum(1 for cid, d in ledger.done.items()
                          if d.status == 200 and ledger.sent[cid].streamed)
        assert codes[200] >= 20 and codes[400] and codes[429] and streamed_ok, codes
        assert ledger.transport_errors > 0  # the kill cut requests short

        # 2. The same data dir and port: the replica's own log directory, a new segment,
        # and every acknowledged request's row (materialised at start-up), once.
        srv = site.start()
        own = site.data_dir / "request-log" / replica_name(site.port)
        assert replicas(site.data_dir / "request-log") == [own]
        assert [p.name for p in sorted(own.glob("seg-*.jsonl"))] == [
            "seg-00000001.jsonl", "seg-00000002.jsonl"]
        rows = _rows_covering(site, set(ledger.done))
        by_cid = _check_ledger(rows, ledger)
        print(f"\n[{store}/{sync}] SIGKILL after {killed_after:.1f} s: sent {len(ledger.sent)}, "
              f"acknowledged {len(ledger.done)} {dict(codes)} ({streamed_ok} streamed 200s), "
              f"cut {len(ledger.sent) - len(ledger.done)}; rows {len(rows)} "
              f"({len(set(by_cid) - set(ledger.done))} of cut requests)")

        # 3. The restarted server records on (limits start afresh: in-memory counters):
        # N requests, a graceful stop, and then exactly N new rows — no restart needed.
        later = Ledger()
        per_client = len(KINDS)  # every kind once per client
        plan = [(throttled if i % 3 == 0 else free, i) for i in range(12)]
        asyncio.run(_run_clients(srv.url, plan, later, 30, max_requests=per_client))
        n = len(plan) * per_client
        assert len(later.sent) == len(later.done) == n and not later.transport_errors
        # 4 throttled clients x 4 valid requests: 5 admitted, 11 throttled; 2 of 6 invalid.
        assert Counter(d.status for d in later.done.values()) == {
            200: n - 24 - 11, 400: 24, 429: 11}
        stop_server(srv)
        log = srv.log()  # a clean shutdown: its materialisation pass raised nothing
        assert srv.proc.returncode == 0 and "Application shutdown complete." in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        site.srv = None
        after = site.rows()  # the server is down: what its shutdown left
        assert len(after) == len(rows) + n, (len(after), len(rows), n)
        _check_ledger(after, Ledger({**ledger.sent, **later.sent},
                                    {**ledger.done, **later.done}))


def test_overlapping_materialisation_passes_insert_each_row_once(tmp_path: Path) -> None:
    """The shutdown pass can start while a periodic pass is still running in its thread
    (cancelling ``run`` does not stop ``to_thread``): they take turns, so neither reads
    the same checkpoint and inserts the same rows as the other (a primary-key error)."""
    cfg = ServerConfig(data_dir=tmp_path, database_url=None)
    db = open_database(cfg)
    log = RequestLog(tmp_path / "request-log", "host-1", "write")
    record = {"usage": True, "client_request_id": None, "workspace_id": "1", "requester": "u",
              "status_code": 200, "request_time": 1, "input_token_count": 3,
              "output_token_count": 4, "input_character_count": 9,
              "output_character_count": 12, "usage_context": None, "request_streaming": False,
              "served_entity_id": None, "endpoint_name": EP}

    async def fill() -> None:
        await asyncio.gather(*(log.append({**record, "databricks_request_id": uuid.uuid4().hex})
                               for _ in range(3000)))

    asyncio.run(fill())
    log.close()
    try:
        materializer = UsageMaterializer(tmp_path / "request-log", UsageStore(db))
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def one_pass() -> None:
            start.wait()
            try:
                materializer.run_once()
            except Exception as exc:
                errors.append(exc)

        passes = [threading.Thread(target=one_pass) for _ in range(2)]
        for t in passes:
            t.start()
        for t in passes:
            t.join()
        assert not errors, errors
        assert UsageStore(db).count() == 3000
    finally:
        db.close()
