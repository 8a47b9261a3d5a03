"""Inference tables and the usage tables as real Delta Lake tables (governance §1.5, §2, §3).

A real ``fmserve serve --no-bundled`` with the fake OpenAI upstream, its tables under
``FMSERVE_TABLES_URL=file://…``; rows are read back with DuckDB's own ``delta`` extension
(``delta_scan``, loaded offline from the ``duckdb-ext-delta`` wheel: no download) and with
``deltalake`` → pyarrow/pandas. Covered: the §3 columns and types, raw request and
response bodies (streamed answers aggregated), error answers with their body, the 1 MB
limit, the real ``openai`` client and ``databricks-sdk``, ``endpoint_usage`` and
``served_entities`` as Delta, bad configs (a 400 naming the field, nothing stored
changes, the old table keeps filling), ``fmserve tables list|show``, exactly-once across
``kill -9`` under load, the materialiser's crash windows, and one local-model endpoint
on the bundled SmolLM2.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from conftest import (
    Server,
    create_external,
    fmserve_cmd,
    gateway_server,
    openai_for,
    stop_server,
    wait_for,
)
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from fakes import openai as fake_openai
from fakes.server import FakeServer

from fmserve.gateway.inference_tables import CONSUMER, TablesMaterializer, ordinal
from fmserve.protocol.stream_aggregate import StreamAggregator
from fmserve.store.delta_tables import DeltaTables, TableError
from fmserve.store.request_log import RequestLog, read_entries
from fmserve.testing import LocalServer, free_port, wait_until_up

COLUMNS = [  # governance §3, in order, with DuckDB's names for the Delta types
    ("databricks_request_id", "VARCHAR"), ("request_date", "DATE"),
    ("client_request_id", "VARCHAR"), ("request_time", "TIMESTAMP WITH TIME ZONE"),
    ("status_code", "INTEGER"), ("sampling_fraction", "DOUBLE"),
    ("execution_duration_ms", "BIGINT"), ("request", "VARCHAR"), ("response", "VARCHAR"),
    ("logging_error_codes", "VARCHAR[]"), ("served_entity_id", "VARCHAR"),
    ("requester", "VARCHAR")]
ADMIN = "admin@fmserve.local"


@functools.cache
def duck() -> duckdb.DuckDBPyConnection:
    """DuckDB with its ``delta`` extension loaded from the ``duckdb-ext-delta`` wheel
    (never downloaded: autoinstall is off and the extension directory is the wheel's)."""
    import duckdb_ext  # namespace package of duckdb-ext-delta

    con = duckdb.connect()
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET extension_directory = ?",
                [str(Path(list(duckdb_ext.__path__)[0]) / "extensions")])
    con.execute("LOAD delta")
    return con


def scan(uri: str, where: str = "true", params: list[Any] | None = None
         ) -> list[dict[str, Any]]:
    cur = duck().cursor()
    try:
        cur.execute(f"SELECT * FROM delta_scan('{uri}') WHERE {where}", params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        cur.close()


def rows_for(uri: str, cids: set[str], timeout_s: float = 15) -> dict[str, dict[str, Any]]:
    """The table's rows of these ``client_request_id`` once all are there (≤ 10 s is the
    promise; waits up to ``timeout_s``)."""
    def ready() -> dict[str, dict[str, Any]] | None:
        if not Path(uri.removeprefix("file://"), "_delta_log").exists():
            return None
        got = {r["client_request_id"]: r for r in scan(uri) if r["client_request_id"] in cids}
        return got if set(got) == cids else None
    return wait_for(ready, timeout_s, f"rows of {sorted(cids)} in {uri}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lake() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-lake-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def srv(lake: Path) -> Iterator[Server]:
    with gateway_server("fmserve-it-", {"FMSERVE_TABLES_URL": f"file://{lake}"}) as s:
        yield s


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_openai.fake() as server:
        yield server


def enable(srv: Server, name: str, catalog: str = "main", schema: str = "logs",
           usage: bool = True, **extra: Any) -> httpx.Response:
    with srv.client() as c:
        gw: dict[str, Any] = {"inference_table_config": {
            "catalog_name": catalog, "schema_name": schema, "enabled": True, **extra}}
        if usage:
            gw["usage_tracking_config"] = {"enabled": True}
        return c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway", json=gw)


def test_rows_streamed_and_not_read_by_duckdb_and_deltalake(srv: Server, fake: FakeServer,
                                                           lake: Path) -> None:
    name = "it-chat"
    create_external(srv, name, fake_openai.external_model(fake.url))
    r = enable(srv, name)
    assert r.status_code == 200, r.text
    # The echo fills the prefix with the endpoint name (governance §1.1).
    assert r.json()["inference_table_config"] == {
        "catalog_name": "main", "schema_name": "logs", "table_name_prefix": name,
        "enabled": True}
    uri = f"file://{lake}/main/logs/{name}_payload"
    # The table exists (empty, with its schema) as soon as the config is accepted.
    assert [(c[0], c[1]) for c in duck().execute(
        f"DESCRIBE SELECT * FROM delta_scan('{uri}')").fetchall()] == COLUMNS

    oa = openai_for(srv)
    cid = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in ("plain", "stream", "sdk", "bad")}
    sent_plain = [{"role": "user", "content": "hello table"}]
    plain = oa.chat.completions.create(model=name, messages=sent_plain, max_tokens=32,
                                       extra_body={"client_request_id": cid["plain"]})
    started = time.monotonic()
    deltas = []
    for chunk in oa.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "stream me"}], stream=True,
            extra_body={"client_request_id": cid["stream"]}):
        for ch in chunk.choices:
            deltas.append(ch.delta.content or "")
    w = WorkspaceClient(host=srv.url, token=srv.token, auth_type="pat")
    sdk = w.serving_endpoints.query(name, messages=[ChatMessage(
        role=ChatMessageRole.USER, content="from the sdk")], client_request_id=cid["sdk"],
        usage_context={"team": "lake"})
    with srv.client() as c:
        bad = c.post(f"/serving-endpoints/{name}/invocations", json={
            "messages": [{"role": "user", "content": "x"}], "temperature": 9,
            "client_request_id": cid["bad"]})
    assert bad.status_code == 400

    rows = rows_for(uri, set(cid.values()))
    readable_after = time.monotonic() - started
    assert readable_after < 10, readable_after
    p = rows[cid["plain"]]
    assert p["status_code"] == 200 and p["sampling_fraction"] == 1.0
    assert p["logging_error_codes"] == [] and p["requester"] == ADMIN
    assert json.loads(p["request"])["messages"] == sent_plain
    resp = json.loads(p["response"])
    assert resp["id"] == plain.id and resp["object"] == "chat.completion"
    assert resp["choices"][0]["message"]["content"] == plain.choices[0].message.content
    assert resp["usage"]["completion_tokens"] == plain.usage.completion_tokens
    assert p["request_date"] == p["request_time"].astimezone(dt.UTC).date()
    assert abs((dt.datetime.now(dt.UTC) - p["request_time"]).total_seconds()) < 60
    assert 0 <= p["execution_duration_ms"] < 10_000
    assert len(p["served_entity_id"]) == 32 and len(p["databricks_request_id"]) == 32

    s = rows[cid["stream"]]
    agg = json.loads(s["response"])  # one chat.completion, not chunks
    assert agg["object"] == "chat.completion" and s["status_code"] == 200
    assert agg["choices"][0]["message"] == {"role": "assistant", "content": "".join(deltas)}
    assert agg["choices"][0]["finish_reason"] == "stop"
    assert json.loads(s["request"])["stream"] is True

    k = rows[cid["sdk"]]
    assert json.loads(k["response"])["choices"][0]["message"]["content"] == \
        sdk.choices[0].message.content
    assert json.loads(k["request"])["usage_context"] == {"team": "lake"}

    b = rows[cid["bad"]]
    assert b["status_code"] == 400
    assert json.loads(b["response"]) == bad.json()  # the error body the client got

    # deltalake → pyarrow / pandas reads the same table.
    from deltalake import DeltaTable
    table = DeltaTable(uri)
    assert table.metadata().partition_columns == ["request_date"]
    df = table.to_pandas()
    assert set(cid.values()) <= set(df["client_request_id"])
    assert [f.name for f in table.to_pyarrow_table().schema] == [c for c, _ in COLUMNS]

    # The usage tables, same layout, same SQL engine: one join across all of it.
    joined = duck().execute(f"""
        SELECT p.client_request_id, u.input_token_count, u.status_code, e.endpoint_name,
               u.usage_context
        FROM delta_scan('{uri}') p
        JOIN delta_scan('file://{lake}/system/serving/endpoint_usage') u
          USING (databricks_request_id)
        JOIN delta_scan('file://{lake}/system/serving/served_entities') e
          ON e.served_entity_id = p.served_entity_id
        WHERE p.client_request_id = ?""", [cid["sdk"]]).fetchall()
    assert len(joined) == 1
    _, tokens_in, status, endpoint, ctx = joined[0]
    assert tokens_in > 0 and status == 200 and endpoint == name and ctx == {"team": "lake"}


def test_sdk_and_mlflow_configure_the_table(srv: Server, fake: FakeServer, lake: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """databricks-sdk ``put_ai_gateway`` and mlflow ``update_endpoint_ai_gateway`` (the
    mlflow docstring's own example body): the echo fills ``table_name_prefix`` and both
    clients parse it; a query through mlflow lands in the table."""
    from databricks.sdk.service.serving import AiGatewayInferenceTableConfig
    from mlflow.deployments import get_deploy_client

    name = "it-sdk"
    create_external(srv, name, fake_openai.external_model(fake.url))
    w = WorkspaceClient(host=srv.url, token=srv.token, auth_type="pat")
    r = w.serving_endpoints.put_ai_gateway(name, inference_table_config=(
        AiGatewayInferenceTableConfig(catalog_name="main", schema_name="sdk", enabled=True)))
    assert r.inference_table_config is not None
    assert r.inference_table_config.table_name_prefix == name
    got = w.serving_endpoints.get(name).ai_gateway
    assert got is not None and got.inference_table_config == r.inference_table_config
    monkeypatch.setenv("DATABRICKS_HOST", srv.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", srv.token)
    client = get_deploy_client("databricks")
    echo = client.update_endpoint_ai_gateway(name, {  # type: ignore[attr-defined]
        "usage_tracking_config": {"enabled": True},
        "inference_table_config": {"enabled": True, "catalog_name": "main",
                                   "schema_name": "sdk"}})
    assert echo == {"usage_tracking_config": {"enabled": True},
                    "inference_table_config": {"catalog_name": "main", "schema_name": "sdk",
                                               "table_name_prefix": name, "enabled": True}}
    cid = f"mlflow-{uuid.uuid4().hex[:8]}"
    answer = client.predict(endpoint=name, inputs={
        "messages": [{"role": "user", "content": "via mlflow"}], "client_request_id": cid})
    row = rows_for(f"file://{lake}/main/sdk/{name}_payload", {cid})[cid]
    assert json.loads(row["response"])["choices"] == answer["choices"]


def test_guardrail_blocks_are_logged_with_their_400_body(srv: Server, fake: FakeServer,
                                                         lake: Path) -> None:
    """Input block (not streamed) and output block (streamed: the error event) each leave
    a row with status 400 and the §1.4 block body as ``response``."""
    name = "it-guard"
    create_external(srv, name, fake_openai.external_model(fake.url))
    with srv.client() as c:
        r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway", json={
            "inference_table_config": {"catalog_name": "main", "schema_name": "logs",
                                       "enabled": True},
            "guardrails": {"input": {"invalid_keywords": ["forbidden"]},
                           "output": {"invalid_keywords": ["secret"]}}})
        assert r.status_code == 200, r.text
        cin, cout = f"in-{uuid.uuid4().hex[:8]}", f"out-{uuid.uuid4().hex[:8]}"
        blocked = c.post(f"/serving-endpoints/{name}/invocations", json={
            "messages": [{"role": "user", "content": "a forbidden word"}],
            "client_request_id": cin})
        assert blocked.status_code == 400
        events = []
        with c.stream("POST", f"/serving-endpoints/{name}/invocations", json={
                "messages": [{"role": "user", "content": "tell the secret"}], "stream": True,
                "client_request_id": cout}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
    rows = rows_for(f"file://{lake}/main/logs/{name}_payload", {cin, cout})
    assert rows[cin]["status_code"] == 400
    assert json.loads(rows[cin]["response"]) == blocked.json()
    assert "input_guardrail_triggered" in json.loads(rows[cin]["response"])["message"]
    assert rows[cout]["status_code"] == 400
    body = json.loads(rows[cout]["response"])
    assert body["error_code"] == "BAD_REQUEST"
    assert json.loads(body["message"])["finishReason"] == "output_guardrail_triggered"
    assert any(e.get("error_code") == "BAD_REQUEST" for e in events)


def test_payloads_over_1mb_keep_the_row_without_the_body(srv: Server, fake: FakeServer,
                                                         lake: Path) -> None:
    name = "it-big"
    create_external(srv, name, fake_openai.external_model(fake.url))
    assert enable(srv, name, usage=False).status_code == 200
    uri = f"file://{lake}/main/logs/{name}_payload"
    big, half = "a" * (1024 * 1024 + 10), "b" * (600 * 1024)
    cids = {"both": f"both-{uuid.uuid4().hex[:8]}", "resp": f"resp-{uuid.uuid4().hex[:8]}",
            "small": f"small-{uuid.uuid4().hex[:8]}"}
    with srv.client() as c:
        for key, text, n in (("both", big, 1), ("resp", half, 2), ("small", "hi", 1)):
            r = c.post(f"/serving-endpoints/{name}/invocations", json={
                "messages": [{"role": "user", "content": text}], "n": n,
                "client_request_id": cids[key]})
            assert r.status_code == 200, r.text[:300]
    rows = rows_for(uri, set(cids.values()))
    both, resp, small = rows[cids["both"]], rows[cids["resp"]], rows[cids["small"]]
    assert both["request"] is None and both["response"] is None
    assert both["logging_error_codes"] == ["MAX_REQUEST_SIZE_EXCEEDED",
                                           "MAX_RESPONSE_SIZE_EXCEEDED"]
    assert json.loads(resp["request"])["messages"][0]["content"] == half  # 600 KB: kept
    assert resp["response"] is None and resp["logging_error_codes"] == [
        "MAX_RESPONSE_SIZE_EXCEEDED"]
    assert small["logging_error_codes"] == [] and small["response"] is not None
    assert both["status_code"] == resp["status_code"] == 200


def test_bad_configs_are_400_naming_the_field_and_change_nothing(
        srv: Server, fake: FakeServer, lake: Path) -> None:
    name = "it-bad"
    create_external(srv, name, fake_openai.external_model(fake.url))
    assert enable(srv, name, usage=False).status_code == 200
    (lake / "blocked").write_text("a file where a catalog folder would go")
    with srv.client() as c:
        before = c.get(f"/api/2.0/serving-endpoints/{name}").json()["ai_gateway"]
        cases = [
            ({"catalog_name": "my-cat", "schema_name": "s", "enabled": True}, "catalog_name"),
            ({"catalog_name": "1cat", "schema_name": "s", "enabled": True}, "catalog_name"),
            ({"catalog_name": "main", "schema_name": "a.b", "enabled": True}, "schema_name"),
            ({"catalog_name": "main", "schema_name": "s", "table_name_prefix": "x/y",
              "enabled": True}, "table_name_prefix"),
            ({"catalog_name": "main", "schema_name": "s", "enabled": True, "colour": "red"},
             "colour"),
            ({"catalog_name": "main", "enabled": True}, "inference_table_config"),
            ({"catalog_name": "main", "schema_name": "other", "enabled": True},
             "schema_name"),  # changed while enabled: disable first
            ({"catalog_name": "blocked", "schema_name": "s", "enabled": False},
             None),  # disabling with new names is fine (and probes nothing) ...
        ]
        for cfg, field in cases[:-1]:
            r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway",
                      json={"inference_table_config": cfg})
            assert r.status_code == 400, (cfg, r.text)
            body = r.json()
            assert body["error_code"] == "INVALID_PARAMETER_VALUE"
            assert field in body["message"], (field, body["message"])
            assert c.get(f"/api/2.0/serving-endpoints/{name}").json()["ai_gateway"] == before
        # A location deltalake cannot write to (a file where the catalog folder goes):
        # disable first, then enabling there is refused and the disabled config stays.
        r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway",
                  json={"inference_table_config": cases[-1][0]})
        assert r.status_code == 200, r.text
        disabled = r.json()
        r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway", json={
            "inference_table_config": {"catalog_name": "blocked", "schema_name": "s",
                                       "enabled": True}})
        assert r.status_code == 400 and "inference_table_config" in r.json()["message"]
        assert "blocked.s.it-bad_payload" in r.json()["message"]
        assert c.get(f"/api/2.0/serving-endpoints/{name}").json()["ai_gateway"] == disabled
        # Creating an endpoint with a bad table config stores no endpoint at all.
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": "it-bad-new", "config": {"served_entities": [
                {"external_model": fake_openai.external_model(fake.url)}]},
            "ai_gateway": {"inference_table_config": {
                "catalog_name": "bad name", "schema_name": "s", "enabled": True}}})
        assert r.status_code == 400 and "catalog_name" in r.json()["message"]
        assert c.get("/api/2.0/serving-endpoints/it-bad-new").status_code == 404
        # Re-enabled on the old table: it keeps filling.
        assert enable(srv, name, usage=False).status_code == 200
        cid = f"after-{uuid.uuid4().hex[:8]}"
        assert c.post(f"/serving-endpoints/{name}/invocations", json={
            "messages": [{"role": "user", "content": "still logged"}],
            "client_request_id": cid}).status_code == 200
    rows_for(f"file://{lake}/main/logs/{name}_payload", {cid})


def test_cli_tables_list_and_show(srv: Server, fake: FakeServer, lake: Path) -> None:
    name = "it-cli"
    create_external(srv, name, fake_openai.external_model(fake.url))
    assert enable(srv, name).status_code == 200
    cid = f"cli-{uuid.uuid4().hex[:8]}"
    with srv.client() as c:
        assert c.post(f"/serving-endpoints/{name}/invocations", json={
            "messages": [{"role": "user", "content": "for the cli"}],
            "client_request_id": cid}).status_code == 200
    rows_for(f"file://{lake}/main/logs/{name}_payload", {cid})
    env = {**os.environ, "FMSERVE_TABLES_URL": f"file://{lake}", "COLUMNS": "200"}
    out = subprocess.run([*fmserve_cmd(), "tables", "list"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for table in (f"main.logs.{name}_payload", "system.serving.endpoint_usage",
                  "system.serving.served_entities"):
        assert table in out.stdout
    out = subprocess.run([*fmserve_cmd(), "tables", "show", f"main.logs.{name}_payload",
                          "--limit", "5"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert cid in out.stdout and "status_code" in out.stdout
    out = subprocess.run([*fmserve_cmd(), "tables", "show", "main.logs.nope_payload"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "main.logs.nope_payload" in out.stderr


# -- exactly once -------------------------------------------------------------------------


def _serve(tmp: Path, port: int, token: str | None) -> LocalServer:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABRICKS_TOKEN", "FMSERVE_DATABASE_URL", "FMSERVE_TABLES_URL")}
    env["FMSERVE_HOME"] = str(tmp / "data")
    if token is None:
        token = subprocess.run([*fmserve_cmd(), "admin-token"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([*fmserve_cmd(), "serve", "--no-bundled", "--port", str(port)],
                                env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = LocalServer(f"http://127.0.0.1:{port}", token, tmp / "data", proc, log_path)
    return wait_until_up(srv, "/health", 60, "fmserve serve")


async def _load(srv: LocalServer, name: str, seconds: float, done: dict[str, int],
                sent: set[str], conns: int = 32) -> None:
    """``conns`` clients loop for ``seconds``; ``done`` gets each fully received answer."""
    stop = time.monotonic() + seconds

    async def one(c: httpx.AsyncClient, i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            cid = f"k{i}-{n}-{uuid.uuid4().hex[:6]}"
            stream = n % 2 == 0
            sent.add(cid)
            body = {"messages": [{"role": "user", "content": f"load {cid}"}],
                    "client_request_id": cid, "stream": stream}
            try:
                if stream:
                    async with c.stream("POST", f"/serving-endpoints/{name}/invocations",
                                        json=body) as r:
                        text = b"".join([x async for x in r.aiter_bytes()])
                        if text.rstrip().endswith(b"data: [DONE]"):
                            done[cid] = r.status_code
                else:
                    r = await c.post(f"/serving-endpoints/{name}/invocations", json=body)
                    done[cid] = r.status_code
            except httpx.HTTPError:
                return

    async with srv.async_client() as c:
        await asyncio.gather(*(one(c, i) for i in range(conns)))


def test_kill9_under_load_then_restart_every_answer_exactly_once(fake: FakeServer) -> None:
    """Default layout (``<data dir>/tables``); SIGKILL while 32 clients are mid-request;
    after the restart every request answered in full has exactly one row, none two."""
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-it-kill-"))
    port = free_port()
    name = "it-kill"
    srv = _serve(tmp, port, None)
    try:
        create_external(srv, name, fake_openai.external_model(fake.url))
        assert enable(srv, name, catalog="ml", schema="prod").status_code == 200
        done: dict[str, int] = {}
        sent: set[str] = set()

        async def load_then_kill() -> None:
            """Kill once 60 answers are in (the load is well under way), at most 30 s."""
            task = asyncio.ensure_future(_load(srv, name, 60.0, done, sent))
            deadline = time.monotonic() + 30
            while len(done) < 60 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            os.kill(srv.proc.pid, signal.SIGKILL)
            await task
        asyncio.run(load_then_kill())
        srv.proc.wait()
        assert len(done) >= 60 and len(sent) > len(done), (len(done), len(sent))
        srv = _serve(tmp, port, srv.token)
        uri = str(tmp / "data" / "tables" / "ml" / "prod" / f"{name}_payload")

        def all_there() -> list[dict[str, Any]] | None:
            got = scan(uri)
            return got if {r["client_request_id"] for r in got} >= set(done) else None
        rows = wait_for(all_there, 20, "every answered request in the table")
        counts = Counter(r["client_request_id"] for r in rows)
        assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
        assert set(counts) <= sent
        for r in rows:
            if r["client_request_id"] in done:
                assert r["status_code"] == done[r["client_request_id"]] == 200
                assert json.loads(r["response"])["object"] == "chat.completion"
        usage = scan(str(tmp / "data" / "tables" / "system" / "serving" / "endpoint_usage"))
        ucounts = Counter(r["client_request_id"] for r in usage)
        assert set(done) <= set(ucounts) and max(ucounts.values()) == 1
    finally:
        stop_server(srv)
        shutil.rmtree(tmp, ignore_errors=True)


class _FakeStore:
    """The checkpoint side of UsageStore, in memory (the crash windows are in the
    materialiser, not the database)."""

    def __init__(self) -> None:
        self.cp: dict[tuple[str, str], Any] = {}

    def checkpoint(self, consumer: str, replica: str) -> Any:
        return self.cp.get((consumer, replica))

    def materialize(self, consumer: str, replica: str, records: list[Any], pos: Any) -> int:
        self.cp[(consumer, replica)] = pos
        return 0

    def entities(self) -> list[dict[str, Any]]:
        return []


def _record(i: int) -> dict[str, Any]:
    return {"usage": True, "databricks_request_id": uuid.uuid4().hex,
            "client_request_id": f"r{i}", "requester": ADMIN, "status_code": 200,
            "request_time": int(time.time() * 1000), "served_entity_id": "e" * 32,
            "input_token_count": 1, "output_token_count": 2,
            "inference": {"table": "c.s.t_payload", "request": "{}", "response": "{}",
                          "execution_duration_ms": 3, "logging_error_codes": []}}


def test_commit_without_checkpoint_is_not_written_twice(tmp_path: Path) -> None:
    """The crash windows: a Delta commit made but the checkpoint not moved (whole batch,
    and a batch that a restart reads longer than before) — the catch-up writes each
    record once; records after the commit are still written."""
    root = tmp_path / "log"
    log = RequestLog(root, "r1", "write")
    tables = DeltaTables(tmp_path / "lake")
    store = _FakeStore()
    m = TablesMaterializer(root, store, tables)  # type: ignore[arg-type]

    async def main() -> int:
        for i in range(10):
            await log.append(_record(i))
        entries, end = read_entries(root / "r1", None, max_records=6)
        assert end is not None
        m._batch("fmserve-log-r1", entries, end)  # committed, "killed" before the checkpoint
        for i in range(10, 14):
            await log.append(_record(i))
        return m.run_once()
    try:
        # 4 left of the first 10 and 4 new, each in the payload table and endpoint_usage
        assert asyncio.run(main()) == 16
    finally:
        log.close()
    got = Counter(r["client_request_id"]
                  for r in scan(str(tmp_path / "lake" / "c" / "s" / "t_payload")))
    assert got == Counter(f"r{i}" for i in range(14))
    assert tables.txn_version("c.s.t_payload", "fmserve-log-r1") == ordinal(
        store.checkpoint(CONSUMER, "r1"))
    assert m.run_once() == 0  # nothing new: nothing written
    usage = scan(str(tmp_path / "lake" / "system" / "serving" / "endpoint_usage"))
    assert sorted(r["client_request_id"] for r in usage) == sorted(f"r{i}" for i in range(14))


def test_compaction_keeps_rows_and_schema(tmp_path: Path) -> None:
    tables = DeltaTables(f"file://{tmp_path}")
    for v in range(1, 6):
        tables.append("c.s.t_payload", [{"databricks_request_id": f"id{v}",
                                         "client_request_id": f"r{v}",
                                         "request_date": dt.date(2026, 1, v),
                                         "logging_error_codes": []}], "app", v)
    from deltalake import DeltaTable
    before = len(DeltaTable(tables.uri("c.s.t_payload")).file_uris())
    tables.compact("c.s.t_payload")
    t = DeltaTable(tables.uri("c.s.t_payload"))
    assert len(t.file_uris()) == before == 5  # one file per partition (one per day)
    assert sorted(r["client_request_id"] for r in scan(tables.uri("c.s.t_payload"))) == \
        [f"r{v}" for v in range(1, 6)]
    for _ in range(3):  # several small files in one partition → one
        tables.append("c.s.t_payload", [{"databricks_request_id": "x", "client_request_id": "x",
                                         "request_date": dt.date(2026, 1, 1),
                                         "logging_error_codes": []}], "app", 10 + _)
    n = len(DeltaTable(tables.uri("c.s.t_payload")).file_uris())
    tables.compact("c.s.t_payload")
    t = DeltaTable(tables.uri("c.s.t_payload"))
    assert len(t.file_uris()) == n - 3 and t.transaction_version("app") == 12
    assert len(scan(tables.uri("c.s.t_payload"))) == 8


def test_table_with_other_columns_is_refused_not_altered(tmp_path: Path) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake
    write_deltalake(str(tmp_path / "c" / "s" / "t_payload"), pa.table({"x": [1]}))
    tables = DeltaTables(tmp_path)
    with pytest.raises(TableError, match="other columns"):
        tables.probe("c.s.t_payload")
    with pytest.raises(TableError, match="Unknown scheme"):
        DeltaTables("nosuchscheme://bucket/x").probe("c.s.t_payload")
    assert scan(str(tmp_path / "c" / "s" / "t_payload")) == [{"x": 1}]


# -- the stream aggregator ---------------------------------------------------------------


def test_aggregator_tool_calls_reasoning_and_completions() -> None:
    head = {"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    agg = StreamAggregator()
    for delta, finish, usage in (
            ({"role": "assistant", "content": [{"type": "reasoning", "summary": [
                {"type": "summary_text", "text": "Think"}]}]}, None, None),
            ({"content": [{"type": "reasoning", "summary": [
                {"type": "summary_text", "text": "ing", "signature": "sig"}]}]}, None, None),
            ({"content": "Hel"}, None, None), ({"content": "lo"}, None, None),
            ({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "get", "arguments": "{\"a\""}}]},
             None, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}, None, None),
            ({}, "tool_calls", {"prompt_tokens": 3, "completion_tokens": 4,
                                "total_tokens": 7})):
        agg.add({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                 **({"usage": usage} if usage else {})})
    assert agg.body() == {
        "id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant",
            "content": [{"type": "reasoning", "summary": [
                {"type": "summary_text", "text": "Thinking", "signature": "sig"}]},
                {"type": "text", "text": "Hello"}],
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get", "arguments": "{\"a\": 1}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    comp = StreamAggregator()
    for i, text in enumerate(("a", "b", "c")):
        comp.add({"id": "cmpl-1", "object": "text_completion", "choices": [
            {"index": i % 2, "text": text, "finish_reason": "length" if i else None}]})
    assert comp.body()["object"] == "text_completion"
    assert [c["text"] for c in comp.body()["choices"]] == ["ac", "b"]


# -- a local model (the bundled SmolLM2, on the session server) ----------------------------


def test_local_model_endpoint_rows(server: Server) -> None:
    name = "it-local"
    with server.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": name, "config": {"served_entities": [
                {"name": "smol", "entity_name": "system.ai.smollm2-135m-instruct",
                 "entity_version": "1"}]},
            "ai_gateway": {"inference_table_config": {
                "catalog_name": "local", "schema_name": "chat", "enabled": True}}})
        assert r.status_code == 200, r.text
        assert r.json()["ai_gateway"]["inference_table_config"]["table_name_prefix"] == name
        try:
            wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]
                     ["config_update"] == "NOT_UPDATING", timeout_s=180, what="deployment")
            cid = f"local-{uuid.uuid4().hex[:8]}"
            answer = c.post(f"/serving-endpoints/{name}/invocations", json={
                "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8,
                "temperature": 0, "client_request_id": cid})
            assert answer.status_code == 200, answer.text
            scid = f"local-s-{uuid.uuid4().hex[:8]}"
            text = ""
            with c.stream("POST", f"/serving-endpoints/{name}/invocations", json={
                    "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8,
                    "temperature": 0, "stream": True, "client_request_id": scid}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:]).get("choices") or []:
                            text += (ch.get("delta") or {}).get("content") or ""
            uri = str(server.data_dir / "tables" / "local" / "chat" / f"{name}_payload")
            rows = rows_for(uri, {cid, scid})
            assert json.loads(rows[cid]["response"])["choices"][0]["message"]["content"] == \
                answer.json()["choices"][0]["message"]["content"]
            assert json.loads(rows[scid]["response"])["choices"][0]["message"]["content"] == \
                text
            usage = json.loads(rows[scid]["response"])["usage"]
            assert usage["completion_tokens"] >= 1
        finally:
            c.delete(f"/api/2.0/serving-endpoints/{name}")
