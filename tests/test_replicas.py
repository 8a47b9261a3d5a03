"""Rate limits exact across replicas: three ``fmserve serve --no-bundled`` processes sharing
one PostgreSQL database and one private Redis, with 200 concurrent clients spread over them.

Set-up (module-wide): a fresh database ``fmserve_replicas_<random>`` on the PostgreSQL at
``FMSERVE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``,
dropped at the end); a private ``redis-server`` on a free port (stopped, frozen and
restarted here, so never the shared one); the first admin made once by ``fmserve
admin-token`` on replica 1; three replicas plus a fourth with
``FMSERVE_RATE_LIMIT_FAIL_OPEN=1``, all with the same ``FMSERVE_DATABASE_URL``,
``FMSERVE_REDIS_URL`` and ``FMSERVE_SECRETS_KEY``; external ``openai`` endpoints on the fake
OpenAI upstream (``tests/fakes/openai.py``), which counts the calls it gets.

Without PostgreSQL or ``redis-server`` the tests fail (never skip): CI has both.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Server, fmserve_cmd, free_port, postgres_database, wait_for
from cryptography.fernet import Fernet
from fakes import openai as fake_openai
from fakes.server import FakeServer
from identities import SCIM

from fmserve.store.db import Database
from fmserve.store.tokens import TokenStore
from fmserve.store.usage import UsageStore
from fmserve.testing import wait_until_up

REDIS_SERVER = os.environ.get("FMSERVE_TEST_REDIS_SERVER", "/usr/bin/redis-server")
API = "/api/2.0/serving-endpoints"
CLIENTS = 200
CALLS_LIMIT = 100
TOKENS_LIMIT = 1000
MAX_TOKENS = 32
QUICK_S = 2.5  # the most a replica may take to answer 503 when Redis is away


# -- a private Redis -----------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """``redis-server`` on ``port`` (no persistence) as a subprocess of the test."""

    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self) -> None:
        """Start it and wait for ``PING``. Fails the test when it does not come up."""
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited ({self.proc.returncode}):\n"
                            f"{self.log_path.read_text(errors='replace')}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        pytest.fail(f"redis-server on port {self.port} did not answer PING within 10 s")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # also ends a SIGSTOPped server
            self.proc.wait(timeout=10)
        self.proc = None


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class Cluster:
    replicas: list[Server]  # the three fail-closed replicas
    fail_open: Server  # a fourth, with FMSERVE_RATE_LIMIT_FAIL_OPEN=1
    token: str  # the first admin's, from `fmserve admin-token` on replica 1
    pg_url: str
    redis: PrivateRedis
    db: Database  # the shared database, for what the test writes or reads directly
    started_s: float

    @property
    def all(self) -> list[Server]:
        return [*self.replicas, self.fail_open]

    def mint(self, owner_id: str) -> str:
        """A PAT owned by ``owner_id``, written to the shared database (as
        ``identities.mint_pat`` does on one server's SQLite)."""
        return TokenStore(self.db).create(owner_id=owner_id, comment="test_replicas")[0]

    def usage(self, endpoint: str) -> list[dict[str, Any]]:
        """``endpoint_usage`` rows of ``endpoint`` in the shared database."""
        return UsageStore(self.db).usage(endpoint)

    def new_user(self) -> tuple[str, str]:
        """A user created through SCIM on replica 1, with a PAT: ``(userName, token)``."""
        with self.replicas[0].client() as c:
            r = c.post(f"{SCIM}/Users", json={
                "userName": f"rep-{secrets.token_hex(4)}@example.com",
                "displayName": "Replica user"})
        assert r.status_code == 201, r.text
        return r.json()["userName"], self.mint(r.json()["id"])


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_database("fmserve_replicas", required=True) as url:
        yield url


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = fake_openai.fake()
    # Idle connections outlive fmserve's (aiohttp keeps them 15 s): with uvicorn's 5 s, a
    # loaded replica may reuse one the fake is just closing and answer 502 — a race of
    # upstream keep-alive (POSTs are not retried), not what this module tests.
    server.keep_alive_s = 60
    with server:
        yield server


def _env(extra: dict[str, str], home: Path) -> dict[str, str]:
    """This environment without any FMSERVE_/DATABRICKS_ variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FMSERVE_", "DATABRICKS_"))}
    return {**env, **extra, "FMSERVE_HOME": str(home)}


def _launch(tmp: Path, env: dict[str, str]) -> Server:
    """``fmserve serve --no-bundled`` on a free port with data dir ``tmp/data`` (not
    waited for)."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([*fmserve_cmd(), "serve", "--no-bundled", "--port", str(port)],
                                env=_env(env, tmp / "data"), stdout=logf,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Server(f"http://127.0.0.1:{port}", "", tmp / "data", proc, log_path)


def _stop_all(servers: list[Server]) -> None:
    """SIGINT to every server at once (graceful), then wait; SIGKILL after 20 s."""
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGINT)
    for s in servers:
        try:
            s.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture(scope="module")
def cluster(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.fail(f"test_replicas needs redis-server at {REDIS_SERVER} "
                    "(FMSERVE_TEST_REDIS_SERVER; Debian package redis-server)")
    tmp = tmp_path_factory.mktemp("replicas")  # kept (pytest keeps the last 3 runs): logs
    rds = PrivateRedis(free_port(), tmp / "redis.log")
    rds.start()
    env = {"FMSERVE_DATABASE_URL": pg_url, "FMSERVE_REDIS_URL": rds.url,
           "FMSERVE_SECRETS_KEY": Fernet.generate_key().decode(),
           "FMSERVE_EXTERNAL_TIMEOUT_S": "10"}
    started = time.monotonic()
    servers: list[Server] = []
    db: Database | None = None
    try:
        # The first admin, once, on replica 1's data dir; the others find it in the database.
        out = subprocess.run([*fmserve_cmd(), "admin-token", "--comment", "replicas"],
                             env=_env(env, tmp / "r1" / "data"), check=True,
                             capture_output=True, text=True, timeout=120).stdout
        token = out.strip().splitlines()[-1]
        # All four start at once, as a deployment would start them.
        servers = [_launch(tmp / f"r{i}", env) for i in (1, 2, 3)]
        servers.append(_launch(tmp / "open", {**env, "FMSERVE_RATE_LIMIT_FAIL_OPEN": "1"}))
        for s in servers:
            s.token = token
            wait_until_up(s, "/health", 120, f"replica {s.url}")
        db = Database(pg_url)  # migrated by `fmserve admin-token`
        yield Cluster(servers[:3], servers[3], token, pg_url, rds, db,
                      time.monotonic() - started)
    finally:
        _stop_all(servers)
        rds.stop()
        if db is not None:
            db.close()


@dataclass
class Endpoints:
    user: str  # a user created through SCIM on replica 1, CAN_QUERY on every endpoint
    user_token: str
    ids: dict[str, str]  # endpoint name -> id


# The endpoints (external openai model -> the fake, usage tracking on) and their limits.
ENDPOINTS: dict[str, list[dict[str, Any]]] = {
    "rep-open": [],
    "rep-calls": [{"calls": CALLS_LIMIT, "key": "endpoint", "renewal_period": "minute"}],
    "rep-tokens": [{"tokens": TOKENS_LIMIT, "key": "endpoint", "renewal_period": "minute"}],
    "rep-redis": [{"calls": 1000, "key": "endpoint", "renewal_period": "minute"}],
}


@pytest.fixture(scope="module")
def endpoints(cluster: Cluster, fake: FakeServer) -> Endpoints:
    """``ENDPOINTS`` created on replica 1, ``CAN_QUERY`` for a new user; returns once every
    replica (the fail-open one too) serves each of them with its limits."""
    user, token = cluster.new_user()
    ids = {}
    with cluster.replicas[0].client() as c:
        for name, limits in ENDPOINTS.items():
            gw: dict[str, Any] = {"usage_tracking_config": {"enabled": True}}
            if limits:
                gw["rate_limits"] = limits
            r = c.post(API, json={"name": name, "ai_gateway": gw, "config": {
                "served_entities": [{"external_model": fake_openai.external_model(fake.url)}]}})
            assert r.status_code == 200, r.text
            ids[name] = r.json()["id"]
            r = c.put(f"/api/2.0/permissions/serving-endpoints/{ids[name]}", json={
                "access_control_list": [{"user_name": user, "permission_level": "CAN_QUERY"}]})
            assert r.status_code == 200, r.text

    def serving(srv: Server) -> bool:
        with srv.client() as c:
            listed = {e["name"]: e for e in c.get(API).json()["endpoints"]}
            for name, limits in ENDPOINTS.items():
                got = listed.get(name)
                if got is None or got["state"]["ready"] != "READY":
                    return False
                got = c.get(f"{API}/{name}").json()
                if (got.get("ai_gateway") or {}).get("rate_limits") != (limits or None):
                    return False
        return True

    for srv in cluster.all:
        wait_for(lambda srv=srv: serving(srv), 30, f"the endpoints served by {srv.url}")
    return Endpoints(user, token, ids)


# -- helpers ---------------------------------------------------------------------------------


def _body(marker: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"hello [{marker}]"}],
            "max_tokens": max_tokens}


def _upstream_calls(fake: FakeServer, marker: str) -> int:
    """Chat calls the fake upstream received whose prompt carries ``marker``."""
    return sum(1 for rec in list(fake.requests)
               if rec.path.endswith("/chat/completions")
               and f"[{marker}]".encode() in rec.body)


def _ask(srv: Server, token: str, name: str, marker: str, max_tokens: int = MAX_TOKENS
         ) -> httpx.Response:
    return httpx.post(f"{srv.url}/serving-endpoints/{name}/invocations",
                      json=_body(marker, max_tokens),
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)


@dataclass
class Answer:
    replica: int
    status: int  # -1: no HTTP answer (``body["error"]`` says why)
    body: dict[str, Any]
    headers: httpx.Headers
    received_s: float  # monotonic
    took_s: float


async def _burst(urls: list[str], tokens: list[str], name: str, marker: str,
                 per_client: int, clients: int = CLIENTS) -> list[Answer]:
    """``clients`` concurrent clients, released together; client ``i`` sends
    ``per_client`` requests one after another to ``urls[i % len(urls)]`` as principal
    ``tokens[i % len(tokens)]``."""
    # A connection per request: on a loaded machine a kept-alive one may reach the
    # server's keep-alive timeout (uvicorn: 5 s) just as the next request goes out on it
    # (ReadError) — a race of the HTTP client, not what this test is about.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    pools = [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]
    answers: list[Answer] = []
    gate = asyncio.Event()

    async def one(i: int) -> None:
        await gate.wait()
        c = pools[i % len(urls)]
        auth = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
        for _ in range(per_client):
            t0 = time.monotonic()
            try:
                r = await c.post(f"/serving-endpoints/{name}/invocations", json=_body(marker),
                                 headers=auth)
            except httpx.HTTPError as exc:
                answers.append(Answer(i % len(urls), -1, {"error": repr(exc)}, httpx.Headers(),
                                      time.monotonic(), time.monotonic() - t0))
                continue
            answers.append(Answer(i % len(urls), r.status_code, r.json(), r.headers,
                                  time.monotonic(), time.monotonic() - t0))

    try:
        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
    finally:
        for c in pools:
            await c.aclose()
    return answers


def _only(answers: list[Answer], allowed: set[int]) -> None:
    """Every answer has a status in ``allowed`` (else: the odd ones, for the failure)."""
    odd = {(a.status, str(a.body)[:300]) for a in answers if a.status not in allowed}
    assert not odd, odd


def _check_429(a: Answer, per: str) -> int:
    """A refusal in Databricks shape with an integer ``Retry-After``; returns it."""
    assert a.body["error_code"] == "REQUEST_LIMIT_EXCEEDED", a.body
    assert a.body["message"].startswith("REQUEST_LIMIT_EXCEEDED:") and per in a.body["message"]
    retry = a.headers["Retry-After"]
    assert retry.isdigit(), retry
    assert 1 <= int(retry) <= 60
    return int(retry)


# -- tests -----------------------------------------------------------------------------------


def test_replicas_share_identities(cluster: Cluster, endpoints: Endpoints) -> None:
    """One admin token (made once, on replica 1) works on every replica, which all report
    one workspace; a user created through SCIM on replica 1 and granted CAN_QUERY there
    queries through replica 3 as soon as its directory sync (every 2 s) picks it up."""
    print(f"\n4 replicas up in {cluster.started_s:.1f} s")
    ws_ids = set()
    for srv in cluster.all:
        with srv.client() as c:
            assert c.get(API).status_code == 200
        ws_ids.add(httpx.get(f"{srv.url}/.well-known/databricks-config",
                             timeout=10).json()["workspace_id"])
    assert len(ws_ids) == 1
    user, token = cluster.new_user()
    with cluster.replicas[0].client() as c:
        r = c.patch(f"/api/2.0/permissions/serving-endpoints/{endpoints.ids['rep-open']}",
                    json={"access_control_list": [{"user_name": user,
                                                   "permission_level": "CAN_QUERY"}]})
    assert r.status_code == 200, r.text
    created = time.monotonic()
    r3 = cluster.replicas[2]
    first = _ask(r3, token, "rep-open", "identity").status_code
    wait_for(lambda: _ask(r3, token, "rep-open", "identity").status_code == 200, 15,
             "the user created on replica 1 to query through replica 3")
    print(f"user created on replica 1: first answer from replica 3 {first}, 200 after "
          f"{time.monotonic() - created:.1f} s")
    for srv in cluster.all:  # and through every other replica, once synced
        wait_for(lambda srv=srv: _ask(srv, token, "rep-open", "identity").status_code == 200,
                 15, f"the user created on replica 1 to query through {srv.url}")
    with r3.client() as c:
        r = c.get(f"{SCIM}/Users", params={"filter": f'userName eq "{user}"'})
    assert r.status_code == 200 and r.json()["totalResults"] == 1, r.text


def test_calls_limit_exact_across_replicas(cluster: Cluster, endpoints: Endpoints,
                                           fake: FakeServer) -> None:
    """100 calls/minute on the endpoint; 200 clients send 400 requests round-robin over
    three replicas: exactly 100 are admitted (and reach the upstream), 300 get a true 429,
    and all 400 are rows of the shared usage table."""
    name = "rep-calls"
    tokens = [cluster.token, endpoints.user_token]
    start = time.monotonic()
    answers = asyncio.run(_burst([s.url for s in cluster.replicas], tokens, name, "calls", 2))
    took = time.monotonic() - start
    ok = [a for a in answers if a.status == 200]
    print(f"calls: {len(answers)} requests in {took:.1f} s (slowest "
          f"{max(a.took_s for a in answers):.2f} s), {len(ok)} admitted, by replica "
          f"{[sum(1 for a in ok if a.replica == i) for i in range(3)]}")
    assert len(answers) == 2 * CLIENTS
    _only(answers, {200, 429})
    assert len(ok) == CALLS_LIMIT  # not one over, not one under
    assert _upstream_calls(fake, "calls") == CALLS_LIMIT
    # each replica alone got more requests than the limit: only one count for all three
    # keeps the sum at 100 (counters per replica would admit up to 300)
    assert all(sum(1 for a in answers if a.replica == i) > CALLS_LIMIT for i in range(3))
    for a in answers:
        if a.status == 429:
            retry = _check_429(a, f"{CALLS_LIMIT} calls per minute")
            # true: the oldest admitted call leaves the window no earlier than start + 60 s
            assert retry >= 60 - (a.received_s - start) - 1, (retry, a.received_s - start)
    rows = wait_for(lambda: (lambda got: got if len(got) >= len(answers) else None)(
        cluster.usage(name)), 20, "usage rows from every replica's request log")
    assert len(rows) == len(answers)
    assert sum(1 for r in rows if r["status_code"] == 200) == CALLS_LIMIT
    assert sum(1 for r in rows if r["status_code"] == 429) == len(answers) - CALLS_LIMIT


def test_tokens_limit_exact_across_replicas(cluster: Cluster, endpoints: Endpoints,
                                            fake: FakeServer) -> None:
    """1000 tokens/minute: a request reserves its prompt bound (JSON bytes + 64) plus
    max_tokens, settled to its real usage when it ends. The admitted answers' usage never
    sums over the limit, and the bucket is left with less room than one more request
    needs (refusals only where the reservations explain them)."""
    name = "rep-tokens"
    r1, r2, _ = cluster.replicas
    # What one request reserves, as the server reports it for one that can never fit
    # (refused, charged nothing): prompt bound + max_tokens.
    too_big = _ask(r2, cluster.token, name, "tokens", TOKENS_LIMIT + 1)
    assert too_big.status_code == 429 and "lower max_tokens" in too_big.json()["message"]
    m = re.search(r"reserves (\d+) tokens", too_big.json()["message"])
    assert m, too_big.text
    reserve = int(m.group(1)) - (TOKENS_LIMIT + 1) + MAX_TOKENS
    first = _ask(r1, cluster.token, name, "tokens")
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]  # every request here uses as many
    assert 0 < used < reserve
    assert CLIENTS * used > 2 * TOKENS_LIMIT  # the burst asks for far more than the limit

    tokens = [cluster.token, endpoints.user_token]
    start = time.monotonic()
    answers = asyncio.run(_burst([s.url for s in cluster.replicas], tokens, name, "tokens", 1))
    took = time.monotonic() - start
    ok = [a for a in answers if a.status == 200]
    spent = used + sum(a.body["usage"]["total_tokens"] for a in ok)
    print(f"tokens: {reserve} reserved/request, {used} used; {len(answers)} requests in "
          f"{took:.1f} s, {len(ok)} admitted, {spent} of {TOKENS_LIMIT} tokens")
    _only(answers, {200, 429})
    assert ok and len(ok) < len(answers)
    assert spent <= TOKENS_LIMIT  # zero over-admission
    assert _upstream_calls(fake, "tokens") == 1 + len(ok)
    for a in answers:
        if a.status == 429:
            _check_429(a, f"{TOKENS_LIMIT} tokens per minute")
    # One at a time now (nothing in flight): requests fit while the settled usage leaves
    # room for a reservation, then a 429 — on any replica.
    probes = 0
    while True:
        r = _ask(cluster.replicas[probes % 3], cluster.token, name, "tokens")
        if r.status_code != 200:
            break
        probes += 1
        spent += r.json()["usage"]["total_tokens"]
        assert probes <= TOKENS_LIMIT // used, "the tokens limit never refused"
    assert r.status_code == 429, r.text
    print(f"tokens: {probes} more fitted one at a time; {spent} of {TOKENS_LIMIT} used")
    assert spent <= TOKENS_LIMIT
    assert TOKENS_LIMIT - spent < reserve  # refused only because one more would not fit
    assert _upstream_calls(fake, "tokens") == 1 + len(ok) + probes


def _probe_all(cluster: Cluster, servers: list[Server], marker: str, per: int = 5
               ) -> list[Answer]:
    """``per`` concurrent requests to each server (``rep-redis``, as the admin)."""
    async def run() -> list[Answer]:
        parts = await asyncio.gather(*(
            _burst([s.url], [cluster.token], "rep-redis", marker, 1, clients=per)
            for s in servers))
        return [replace(a, replica=i) for i, part in enumerate(parts) for a in part]

    return asyncio.run(run())


def _unavailable_quickly(answers: list[Answer], fail_open: int) -> float:
    """Fail-closed replicas: 503 TEMPORARILY_UNAVAILABLE with an integer Retry-After; the
    fail-open one (index ``fail_open``): 200. Each within QUICK_S. Returns the slowest."""
    for a in answers:
        assert a.took_s < QUICK_S, (a.replica, a.status, a.took_s)
        if a.replica == fail_open:
            assert a.status == 200, a.body
            continue
        assert a.status == 503, a.body
        assert a.body["error_code"] == "TEMPORARILY_UNAVAILABLE", a.body
        assert a.headers["Retry-After"].isdigit(), a.headers
    return max(a.took_s for a in answers)


def test_redis_away_fails_closed_quickly_and_recovers(cluster: Cluster,
                                                      endpoints: Endpoints) -> None:
    """Redis frozen (SIGSTOP: connections open, no answer) or stopped (refused): every
    replica answers 503 + Retry-After within 2.5 s, the fail-open replica admits; Redis
    restarted empty on the same port: service resumes without restarting a replica."""
    servers = cluster.all
    for srv in servers:
        assert _ask(srv, cluster.token, "rep-redis", "redis").status_code == 200
    rds = cluster.redis

    rds.signal(signal.SIGSTOP)
    try:
        slowest = _unavailable_quickly(_probe_all(cluster, servers, "redis"), 3)
        print(f"\nredis frozen: slowest answer {slowest:.2f} s")
    finally:
        rds.signal(signal.SIGCONT)
    rds.stop()
    slowest = _unavailable_quickly(_probe_all(cluster, servers, "redis"), 3)
    print(f"redis stopped: slowest answer {slowest:.2f} s")
    for srv in cluster.replicas:  # an endpoint without rate limits does not need Redis
        assert _ask(srv, cluster.token, "rep-open", "redis-open").status_code == 200

    rds.start()  # same port, empty
    back = time.monotonic()
    for srv in cluster.replicas:
        wait_for(lambda srv=srv: _ask(srv, cluster.token, "rep-redis", "redis").status_code
                 == 200, 10, f"{srv.url} to admit again once Redis is back")
    print(f"redis restarted: every replica admitting after {time.monotonic() - back:.1f} s")
    # the counters are in the new Redis: each call admitted from now on is in its log
    key = f"fmserve:rl:{endpoints.ids['rep-redis']}:endpoint:z"
    before = rds.client().zcard(key)
    answers = _probe_all(cluster, cluster.replicas, "redis", per=3)
    _only(answers, {200})
    assert rds.client().zcard(key) == before + len(answers)
