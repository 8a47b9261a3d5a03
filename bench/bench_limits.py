"""AI Gateway benchmark: what rate limits + usage tracking cost fmserve, and how exactly
three replicas of fmserve and of LiteLLM's proxy hold a shared limit.

Run by hand (not a test), on an otherwise idle machine::

    .venv/bin/python bench/bench_limits.py [--duration 5] [--rounds 5] [--window 15]
                                           [--only onoff|admission] [--no-install]

Needs ``wrk`` (``apt-get install wrk``), ``/usr/bin/redis-server`` (a private instance is
started on a free port, ``--save ''``, and stopped at the end) and, for the second part,
PostgreSQL at ``--postgres`` (default ``postgresql://postgres@127.0.0.1:5432/test``, used
only to create and drop this run's own databases). Everything answers from the fake
OpenAI upstream of ``bench/fake_upstream.py`` (``usage``: 12 + 9 = 21 tokens a request).
LiteLLM (``litellm[proxy]``) is installed into ``.bench/litellm-venv`` the first time,
as ``bench_gateway.py`` does (``--no-install`` refuses to).

**1. Limits + usage on vs off.** For each variant — the limiter in memory or in Redis
(``fmserve serve --redis-url``) × ``FMSERVE_REQUEST_LOG_SYNC`` ``fsync`` or ``write`` — one
``fmserve serve --no-bundled`` with two identical endpoints in front of the upstream:
``off`` (no AI Gateway) and ``on`` (``rate_limits``: an ``endpoint`` and a per-``user``
limit of 10^9 calls and 10^12 tokens a minute, so nothing is refused even though wrk
sends every request with the same token; ``usage_tracking_config`` enabled). ``--rounds``
alternating rounds (order reversed every other round), each case ``--duration`` s:

* ``req/s @32``: wrk, 32 connections (median over rounds; every round listed);
* ``p50 @1`` / ``added p50``: one connection, and the same minus the upstream's own p50
  (the ``direct`` row, measured at the start);
* ``usage rows``: ``endpoint_usage`` rows materialised for ``on`` / requests wrk saw
  answered (rows ≥ requests: wrk does not count what it cut off at the end);
  ``bucket entries``: the sliding-log entries of ``on``'s two buckets in
  Redis (``fmserve:rl:<endpoint id>:endpoint:z`` and ``…:p:<principal id>:z``), or, for
  the in-memory limiter, ``probe ok`` when a 1-call endpoint on the same server refused
  its second call.

Targets, per variant: added p50 (on) ≤ added p50 (off) + 0.3 ms, and req/s (on) ≥ 90 % of
req/s (off).

**2. Over-admission side by side.** 200 concurrent clients (client *i* → instance
*i* mod 3) send chat completions for ``--window`` s (< 60, so one limit window; a run
that would straddle a wall-clock minute waits for the next one, for gateways with
minute buckets) to three instances sharing one limit:

* ``fmserve, 3 replicas``: one PostgreSQL database (``FMSERVE_DATABASE_URL``, one
  ``FMSERVE_SECRETS_KEY``) and the private Redis (``FMSERVE_REDIS_URL``); an endpoint with
  ``{"calls": 100, "key": "user"}`` and one with ``{"tokens": 2000, "key": "user"}``,
  every client with the same token.
* ``LiteLLM, key limits``: a key's ``rpm_limit`` = 100 / ``tpm_limit`` = 2000, enforced by
  LiteLLM's key limiter (``parallel_request_limiter_v3``, its default) with its counters
  in the same Redis (``REDIS_HOST``/``REDIS_PORT``, and ``router_settings``
  ``redis_host``/``redis_port``). A virtual key from ``/key/generate`` needs LiteLLM's
  database client, Prisma, whose ``prisma generate`` downloads engine binaries from
  Prisma's own CDN (not a package registry: unreachable on the benchmark machines, the
  step fails), so the key — the same ``UserAPIKeyAuth`` with ``rpm_limit``/``tpm_limit``
  that a virtual key loads from its database — comes from ``general_settings.custom_auth``.
* ``LiteLLM, model rpm/tpm``: the documented multi-instance router limits —
  ``rpm: 100`` / ``tpm: 2000`` on the deployment, ``router_settings`` with
  ``routing_strategy: usage-based-routing-v2``, ``enable_pre_call_checks`` and the Redis.

Columns: ``attempts`` (requests the clients sent: the offered load), ``calls admitted``
(HTTP 200), ``calls over`` (admitted − the calls limit), ``tokens admitted`` (sum of the
admitted answers' ``usage.total_tokens``), ``tokens over`` (− the tokens limit),
``refused`` (429), ``errors`` (anything else, timeouts after 60 s included: whether those
were admitted is unknown), ``took`` (until the last answer: a client that started a
request inside the window waits for it). Target (fmserve): nothing over the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import (  # noqa: E402
    MODEL,
    TARGET_ADDED_P50_MS,
    AuthRow,
    _chat_body,
    _pkg_version,
    _spawn,
    _stopper,
    _venv,
    alternate,
    console,
    create_endpoint,
    litellm_model,
    spawn_litellm,
    start_upstream,
    terminate,
    wrk,
)

from fmserve.testing import LocalServer, free_port, start_server  # noqa: E402

CONNS = 32
BIG_CALLS, BIG_TOKENS = 10**9, 10**12
TARGET_RPS_RATIO = 0.90
ADM_CALLS, ADM_TOKENS, ADM_CLIENTS, REPLICAS = 100, 2000, 200, 3
TIMEOUT_S = 60  # per request, over-admission clients
VARIANTS = [("memory", "fsync"), ("memory", "write"), ("redis", "fsync"), ("redis", "write")]
ON_GATEWAY: dict[str, Any] = {"rate_limits": [
    {"calls": BIG_CALLS, "tokens": BIG_TOKENS, "key": "endpoint", "renewal_period": "minute"},
    {"calls": BIG_CALLS, "tokens": BIG_TOKENS, "key": "user", "renewal_period": "minute"}],
    "usage_tracking_config": {"enabled": True}}
CHAT = "/serving-endpoints/chat/completions"
LITELLM_MASTER = "sk-litellm-bench"  # custom_auth answers for every key, this one included

# LiteLLM's general_settings.custom_auth: the bearer token names its key's limits.
_LITELLM_AUTH = '''"""bench_limits: keys with rpm/tpm limits, without a database."""
import json
import os

from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ["BENCH_LITELLM_KEYS"])


async def user_api_key_auth(request, api_key):
    if api_key not in KEYS:
        raise Exception("unknown key")
    return UserAPIKeyAuth(api_key=api_key, **KEYS[api_key])
'''


def verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


# ---------------------------------------------------------------- shared services

@contextlib.contextmanager
def private_redis(tmp: Path) -> Iterator[str]:
    """A fresh ``redis-server`` on a free port (no persistence); yields its URL."""
    import redis

    port = free_port()
    log = tmp / "redis.log"
    proc = _spawn(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no"], log, {}, tmp)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis.from_url(url, socket_timeout=1).ping():
                    break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        _stopper(proc)()


@contextlib.contextmanager
def pg_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new database ``<prefix>_<random>`` on ``admin_url``'s server, dropped after."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def principal_id(srv: LocalServer) -> str:
    with srv.client() as c:
        return str(c.get("/api/2.0/preview/scim/v2/Me").json()["id"])


def ask(url: str, headers: dict[str, str], model: str) -> httpx.Response:
    return httpx.post(url, headers=headers, json=_chat_body(model)(False), timeout=30)


# ---------------------------------------------------------------- 1. on vs off

@dataclass
class Variant:
    limiter: str
    sync: str
    off: AuthRow
    on: AuthRow
    usage_rows: int = 0
    on_requests: int = 0  # answered by "on", warm-up included
    buckets: str = ""


def _usage_rows(data_dir: Path, want: int, timeout_s: float = 30) -> int:
    """``endpoint_usage`` rows in the server's SQLite database, once ≥ ``want`` (or after
    ``timeout_s``: materialisation runs in the background)."""
    from fmserve.config import ServerConfig
    from fmserve.store.db import open_database
    from fmserve.store.usage import UsageStore

    deadline = time.monotonic() + timeout_s
    while True:
        db = open_database(ServerConfig(data_dir=data_dir, database_url=None))
        try:
            n = UsageStore(db).count()
        finally:
            db.close()
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


def _probe(srv: LocalServer, upstream: str) -> str:
    """A 1-call endpoint on the same server must refuse its second call."""
    create_endpoint(srv, "bench-probe", upstream, {"rate_limits": [
        {"calls": 1, "key": "user", "renewal_period": "minute"}]})
    codes = [ask(srv.url + CHAT, srv.headers, "bench-probe").status_code for _ in range(2)]
    if codes != [200, 429]:
        raise RuntimeError(f"the 1-call probe endpoint answered {codes}, not [200, 429]")
    return "probe ok"


def _bucket_entries(redis_url: str, srv: LocalServer, endpoint_id: str) -> str:
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = [f"fmserve:rl:{endpoint_id}:endpoint:z",
            f"fmserve:rl:{endpoint_id}:p:{principal_id(srv)}:z"]
    counts = [int(r.zcard(k)) for k in keys]  # type: ignore[arg-type]
    if not all(counts):
        raise RuntimeError(f"no sliding-log entries under {keys} in Redis: {counts}")
    return " / ".join(f"{n:,}" for n in counts)


def run_variant(limiter: str, sync: str, upstream: str, redis_url: str,
                args: argparse.Namespace, tmp: Path) -> Variant:
    serve_args = ("--no-bundled",) + (("--redis-url", redis_url) if limiter == "redis" else ())
    srv = start_server(tmp / f"onoff-{limiter}-{sync}", serve_args=serve_args,
                       env_extra={"FMSERVE_REQUEST_LOG_SYNC": sync})
    v = Variant(limiter, sync, AuthRow("off"), AuthRow("on"))
    try:
        create_endpoint(srv, "bench-off", upstream)
        on = create_endpoint(srv, "bench-on", upstream, ON_GATEWAY)
        gw = on.get("ai_gateway") or {}
        if ([(lim.get("key"), lim.get("calls"), lim.get("tokens"))
             for lim in gw.get("rate_limits") or []]
                != [(lim["key"], lim["calls"], lim["tokens"]) for lim in ON_GATEWAY["rate_limits"]]
                or not (gw.get("usage_tracking_config") or {}).get("enabled")):
            raise RuntimeError(f"the endpoint's ai_gateway is {gw}")
        url = srv.url + CHAT
        for name in ("bench-off", "bench-on"):
            r = ask(url, srv.headers, name)
            if r.status_code != 200 or "How can I help" not in r.text:
                raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:300]}")
            warm = wrk(url, srv.headers, _chat_body(name)(False), CONNS, 2, tmp)
            if name == "bench-on":
                v.on_requests = 1 + warm["requests"]
        console.print(f"[bold]{limiter} limiter, request log {sync}[/bold]: "
                      f"{args.rounds} rounds off/on ...")
        alternate([(v.off, url, srv.headers, _chat_body("bench-off")(False)),
                   (v.on, url, srv.headers, _chat_body("bench-on")(False))],
                  args.rounds, CONNS, args.duration, tmp)
        v.on_requests += v.on.requests
        v.buckets = (_bucket_entries(redis_url, srv, on["id"]) if limiter == "redis"
                     else _probe(srv, upstream))
        v.usage_rows = _usage_rows(srv.data_dir, v.on_requests)
    finally:
        terminate(srv)
    return v


def report_onoff(variants: list[Variant], direct_p50: float, args: argparse.Namespace) -> None:
    t = Table(title=f"fmserve AI Gateway (rate limits + usage tracking) on vs off — median of "
                    f"{args.rounds} alternating rounds, {args.duration:g} s per case; "
                    f"direct upstream p50 @1 {direct_p50:.3f} ms")
    for col in ("limiter", "request log", "AI Gateway", f"req/s @{CONNS}", "p50 @1 (ms)",
                "added p50 (ms)", "rounds req/s", "rounds p50 (ms)", "errors", "usage rows",
                "bucket entries"):
        t.add_column(col, justify="left" if col in ("limiter", "request log", "AI Gateway")
                     else "right")
    verdicts = []
    for v in variants:
        med = {}
        for row in (v.off, v.on):
            rps, p50 = statistics.median(row.rps), statistics.median(row.p50_ms)
            med[row.credential] = (rps, p50)
            on = row is v.on
            rows_pct = f"{v.usage_rows:,} / {v.on_requests:,}" if on else ""
            t.add_row(v.limiter if not on else "", v.sync if not on else "", row.credential,
                      f"{rps:,.0f}", f"{p50:.3f}", f"{p50 - direct_p50:+.3f}",
                      " ".join(f"{x:,.0f}" for x in row.rps),
                      " ".join(f"{x:.2f}" for x in row.p50_ms), str(row.errors), rows_pct,
                      v.buckets if on else "", end_section=on)
        (off_rps, off_p50), (on_rps, on_p50) = med["off"], med["on"]
        verdicts.append((v, on_p50 - off_p50, on_rps / off_rps))
    console.print(t)
    console.print(f"[bold]Targets[/bold]: added p50 (on) <= off + {TARGET_ADDED_P50_MS} ms; "
                  f"req/s (on) >= {TARGET_RPS_RATIO:.0%} of off")
    for v, dp50, ratio in verdicts:
        ok_rows = v.usage_rows >= v.on_requests
        console.print(f"  {v.limiter:6} limiter, {v.sync:5}: p50 on - off {dp50:+.3f} ms "
                      f"{verdict(dp50 <= TARGET_ADDED_P50_MS)}   req/s on/off {ratio:.1%} "
                      f"{verdict(ratio >= TARGET_RPS_RATIO)}   usage rows >= requests "
                      f"{verdict(ok_rows)}"
                      + ("" if not (v.on.errors or v.off.errors) else "  [red]errors[/red]"))


def part_onoff(upstream: str, redis_url: str, args: argparse.Namespace, tmp: Path) -> None:
    direct = (upstream + "/v1/chat/completions", {"Authorization": "Bearer sk-bench"})
    wrk(*direct, _chat_body(MODEL)(False), 1, 2, tmp)
    direct_p50 = wrk(*direct, _chat_body(MODEL)(False), 1, args.duration, tmp)["p50_us"] / 1000
    variants = [run_variant(lim, sync, upstream, redis_url, args, tmp) for lim, sync in VARIANTS]
    report_onoff(variants, direct_p50, args)


# ---------------------------------------------------------------- 2. over-admission

@dataclass
class Admission:
    gateway: str
    limit: str
    calls_limit: int | None
    tokens_limit: int | None
    attempts: int = 0
    admitted: int = 0
    tokens: int = 0
    refused: int = 0
    errors: int = 0
    first_error: str = ""
    took_s: float = 0.0  # until the last client's last answer


def _wait_for_minute(window_s: float) -> None:
    """Sleep into the next wall-clock minute if this one has too little left (gateways
    with per-minute buckets would otherwise legitimately admit twice)."""
    left = 60 - time.time() % 60
    if left < window_s + 3:
        time.sleep(left + 0.5)


async def _load(urls: list[str], headers: list[dict[str, str]], model: str, window_s: float,
                row: Admission) -> None:
    """``ADM_CLIENTS`` clients, client i on ``urls[i % len(urls)]``, each sending one chat
    completion after another until ``window_s`` is over; counts into ``row``."""
    limits = httpx.Limits(max_connections=ADM_CLIENTS, max_keepalive_connections=ADM_CLIENTS)
    clients = [(httpx.AsyncClient(headers=h, limits=limits, timeout=TIMEOUT_S), u)
               for u, h in zip(urls, headers, strict=True)]
    body = _chat_body(model)(False)
    end = time.monotonic() + window_s

    async def client(i: int) -> None:
        c, url = clients[i % len(clients)]
        while time.monotonic() < end:
            row.attempts += 1
            try:
                r = await c.post(url, json=body)
            except httpx.HTTPError as exc:
                row.errors += 1
                row.first_error = row.first_error or repr(exc)
                continue
            if r.status_code == 200:
                row.admitted += 1
                row.tokens += int(r.json()["usage"]["total_tokens"])
            elif r.status_code == 429:
                row.refused += 1
            else:
                row.errors += 1
                row.first_error = row.first_error or f"HTTP {r.status_code}: {r.text[:200]}"

    try:
        await asyncio.gather(*(client(i) for i in range(ADM_CLIENTS)))
    finally:
        for c, _ in clients:
            await c.aclose()


def run_admission(row: Admission, urls: list[str], headers: list[dict[str, str]], model: str,
                  args: argparse.Namespace) -> Admission:
    _wait_for_minute(args.window)
    console.print(f"  {row.gateway}, {row.limit}: {ADM_CLIENTS} clients for {args.window:g} s")
    started = time.monotonic()
    asyncio.run(_load(urls, headers, model, args.window, row))
    row.took_s = time.monotonic() - started
    console.print(f"    {row.attempts:,} attempts, {row.admitted:,} admitted, {row.tokens:,} "
                  f"tokens, {row.refused:,} refused, {row.errors:,} errors")
    return row


def _scenarios() -> list[tuple[str, int | None, int | None]]:
    return [("calls", ADM_CALLS, None), ("tokens", None, ADM_TOKENS)]


def _limit_label(calls: int | None, tokens: int | None) -> str:
    return f"{calls} calls/min" if calls else f"{tokens} tokens/min"


def admission_fmserve(upstream: str, redis_url: str, args: argparse.Namespace,
                      tmp: Path) -> list[Admission]:
    from cryptography.fernet import Fernet

    out = []
    with pg_database(args.postgres, "fmserve_bench") as db_url:
        env = {"FMSERVE_DATABASE_URL": db_url, "FMSERVE_REDIS_URL": redis_url,
               "FMSERVE_SECRETS_KEY": Fernet.generate_key().decode()}
        replicas: list[LocalServer] = []
        try:
            for i in range(REPLICAS):
                replicas.append(start_server(tmp / f"replica-{i}", env,
                                             serve_args=("--no-bundled",)))
            first = replicas[0]
            for kind, calls, tokens in _scenarios():
                limit = {"calls": calls} if calls else {"tokens": tokens}
                gw = {"rate_limits": [{**limit, "key": "user", "renewal_period": "minute"}]}
                create_endpoint(first, f"adm-{kind}", upstream, gw)
            for srv in replicas:  # each replica must see both endpoints, with their limits
                _await_replica(srv, first.headers)
            for kind, calls, tokens in _scenarios():
                row = Admission(f"fmserve, {REPLICAS} replicas (PostgreSQL + Redis)",
                                _limit_label(calls, tokens), calls, tokens)
                out.append(run_admission(row, [s.url + CHAT for s in replicas],
                                         [first.headers] * REPLICAS, f"adm-{kind}", args))
        finally:
            for srv in replicas:
                terminate(srv)
    return out


def _await_replica(srv: LocalServer, headers: dict[str, str], timeout_s: float = 60) -> None:
    """Until ``srv`` answers a query on both admission endpoints (synced from the shared
    database) and lists their limits."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=srv.url, headers=headers, timeout=10) as c:
        for kind, _, _ in _scenarios():
            while True:
                r = c.get(f"/api/2.0/serving-endpoints/adm-{kind}")
                if (r.status_code == 200 and r.json()["state"]["ready"] == "READY"
                        and r.json().get("ai_gateway", {}).get("rate_limits")):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{srv.url}: adm-{kind} not synced: {r.text[:300]}")
                time.sleep(0.25)


def _litellm_set(tmp: Path, bindir: Path, tag: str, config: dict[str, Any],
                 env: dict[str, str]) -> tuple[list[str], Callable[[], None]]:
    """``REPLICAS`` LiteLLM proxies with one config; their chat URLs and a stopper."""
    procs: list[subprocess.Popen[bytes]] = []
    urls = []

    def stop() -> None:
        for p in procs:
            _stopper(p)()

    try:
        for i in range(REPLICAS):
            proc, url = spawn_litellm(tmp, bindir, config, f"litellm-{tag}-{i}", env)
            procs.append(proc)
            urls.append(url + "/v1/chat/completions")
    except Exception:
        stop()
        raise
    return urls, stop


def _litellm_check(urls: list[str], headers: dict[str, str], model: str) -> None:
    r = ask(urls[0], headers, model)
    if r.status_code != 200 or "How can I help" not in r.text:
        raise RuntimeError(f"LiteLLM {model}: HTTP {r.status_code}: {r.text[:300]}")


def admission_litellm(upstream: str, redis_url: str, args: argparse.Namespace,
                      tmp: Path) -> list[Admission]:
    bindir = _venv("litellm", not args.no_install)
    version = _pkg_version(bindir, "litellm")
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    redis_env = {"REDIS_HOST": host, "REDIS_PORT": port}
    router_redis = {"redis_host": host, "redis_port": int(port)}
    settings = {"telemetry": False, "drop_params": True}
    out = []

    # Key limits (the limiter virtual keys use), the key from custom_auth.
    keys = {f"sk-bench-{kind}-{secrets.token_hex(4)}":
            {"rpm_limit": calls, "tpm_limit": tokens} for kind, calls, tokens in _scenarios()}
    (tmp / "bench_litellm_auth.py").write_text(_LITELLM_AUTH)
    urls, stop = _litellm_set(tmp, bindir, "keys", {
        "model_list": [litellm_model(upstream)], "litellm_settings": settings,
        "router_settings": router_redis,
        "general_settings": {"master_key": LITELLM_MASTER,
                             "custom_auth": "bench_litellm_auth.user_api_key_auth"}},
        {**redis_env, "BENCH_LITELLM_KEYS": json.dumps(keys)})
    try:
        for key, (_, calls, tokens) in zip(keys, _scenarios(), strict=True):
            hdrs = {"Authorization": f"Bearer {key}"}
            row = Admission(f"LiteLLM {version}, {REPLICAS} proxies, key limits (Redis)",
                            _limit_label(calls, tokens), calls, tokens)
            out.append(run_admission(row, urls, [hdrs] * REPLICAS, MODEL, args))
    finally:
        stop()

    # Model (deployment) rpm/tpm, the router's multi-instance limits.
    master = {"Authorization": f"Bearer {LITELLM_MASTER}"}
    models = [{**litellm_model(upstream, **({"rpm": calls} if calls else {"tpm": tokens})),
               "model_name": f"adm-{kind}"} for kind, calls, tokens in _scenarios()]
    urls, stop = _litellm_set(tmp, bindir, "router", {
        "model_list": models, "litellm_settings": settings,
        "router_settings": {**router_redis, "routing_strategy": "usage-based-routing-v2",
                            "enable_pre_call_checks": True, "num_retries": 0},
        "general_settings": {"master_key": LITELLM_MASTER}}, redis_env)
    try:
        for kind, calls, tokens in _scenarios():
            row = Admission(f"LiteLLM {version}, {REPLICAS} proxies, model rpm/tpm (Redis)",
                            _limit_label(calls, tokens), calls, tokens)
            out.append(run_admission(row, urls, [master] * REPLICAS, f"adm-{kind}", args))
    finally:
        stop()
    return out


def report_admission(rows: list[Admission], args: argparse.Namespace) -> None:
    t = Table(title=f"Over-admission — {ADM_CLIENTS} concurrent clients over {REPLICAS} "
                    f"instances sharing one limit, {args.window:g} s (one window)")
    for col in ("gateway", "limit", "attempts", "calls admitted", "calls over",
                "tokens admitted", "tokens over", "refused (429)", "errors", "took (s)"):
        t.add_column(col, justify="left" if col in ("gateway", "limit") else "right")
    for r in rows:
        calls_over = "" if r.calls_limit is None else f"{r.admitted - r.calls_limit:+,}"
        tokens_over = "" if r.tokens_limit is None else f"{r.tokens - r.tokens_limit:+,}"
        t.add_row(r.gateway, r.limit, f"{r.attempts:,}", f"{r.admitted:,}", calls_over,
                  f"{r.tokens:,}", tokens_over, f"{r.refused:,}", f"{r.errors:,}",
                  f"{r.took_s:.1f}")
    console.print(t)
    for r in rows:
        if r.first_error:
            console.print(f"  {r.gateway}, {r.limit}: first error: {r.first_error}")
    console.print("[bold]Target[/bold] (fmserve): admitted within the limit")
    for r in rows:
        if r.gateway.startswith("fmserve"):
            over = (r.admitted - r.calls_limit if r.calls_limit is not None
                    else r.tokens - (r.tokens_limit or 0))
            errors = f"  ({r.errors:,} errors, see above)" if r.errors else ""
            console.print(f"  {r.limit}: {over:+,} over  {verdict(over <= 0)}{errors}")


def part_admission(upstream: str, redis_url: str, args: argparse.Namespace,
                   tmp: Path) -> None:
    rows = admission_fmserve(upstream, redis_url, args, tmp)
    rows += admission_litellm(upstream, redis_url, args, tmp)
    report_admission(rows, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5, help="seconds per wrk case (part 1)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating off/on rounds (>= 3)")
    ap.add_argument("--window", type=float, default=15,
                    help="seconds of load per over-admission case (< 60)")
    ap.add_argument("--only", choices=("onoff", "admission"), help="run only that part")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL to create this run's databases on")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of creating the LiteLLM venv under .bench/")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    args = ap.parse_args()
    if args.rounds < 3 or not 0 < args.window < 57:
        raise SystemExit("--rounds must be >= 3 and --window below 57 s")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.only != "onoff":  # install up front so no measurement waits for pip
        _venv("litellm", not args.no_install)
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-bench-limits-"))
    try:
        upstream_proc, upstream = start_upstream(tmp)
        try:
            with private_redis(tmp) as redis_url:
                if args.only != "admission":
                    part_onoff(upstream, redis_url, args, tmp)
                if args.only != "onoff":
                    part_admission(upstream, redis_url, args, tmp)
        finally:
            _stopper(upstream_proc)()
    finally:
        if args.keep_logs:
            console.print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
