"""AI Gateway rate limits and usage tracking on a real server (one process, in-memory
counters): every precedence rule of governance §1.3, calls and tokens, streams, the real
``openai`` client and ``databricks-sdk``, and the usage rows each request leaves."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    Server,
    create_external,
    fmserve_cmd,
    gateway_server,
    wait_for,
)
from databricks.sdk import WorkspaceClient
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole
from fakes import openai as fake_openai
from fakes.server import FakeServer
from identities import Caller, new_group, new_sp, new_user

from fmserve.config import ServerConfig
from fmserve.store.db import open_database
from fmserve.store.usage import UsageStore

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-rl-") as s:
        yield s


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    with fake_openai.fake() as server:
        yield server


def endpoint(srv: Server, fake: FakeServer, name: str, limits: list[dict[str, Any]],
             callers: list[Caller], usage: bool = False) -> dict[str, Any]:
    """A fresh external-model endpoint with these limits, queryable by ``callers``."""
    ep = create_external(srv, name, fake_openai.external_model(fake.url))
    with srv.client() as c:
        gw: dict[str, Any] = {"rate_limits": limits}
        if usage:
            gw["usage_tracking_config"] = {"enabled": True}
        r = c.put(f"/api/2.0/serving-endpoints/{name}/ai-gateway", json=gw)
        assert r.status_code == 200, r.text
        acl = [{"user_name" if k.kind == "user" else "service_principal_name": k.name,
                "permission_level": "CAN_QUERY"} for k in callers]
        r = c.put(f"/api/2.0/permissions/serving-endpoints/{ep['id']}",
                  json={"access_control_list": acl})
        assert r.status_code == 200, r.text
    return ep


def ask(who: Caller, name: str, **kw: Any) -> httpx.Response:
    with who.client() as c:
        return c.post(f"/serving-endpoints/{name}/invocations",
                      json={"messages": MSG, "max_tokens": 16, **kw})


def statuses(who: Caller, name: str, n: int, **kw: Any) -> list[int]:
    return [ask(who, name, **kw).status_code for _ in range(n)]


def test_per_user_default_calls(srv: Server, fake: FakeServer) -> None:
    a, b = new_user(srv), new_user(srv)
    endpoint(srv, fake, "rl-user", [{"calls": 2, "key": "user", "renewal_period": "minute"}],
             [a, b])
    assert statuses(a, "rl-user", 4) == [200, 200, 429, 429]
    assert statuses(b, "rl-user", 3) == [200, 200, 429]  # a bucket per user
    r = ask(a, "rl-user")
    body = r.json()
    assert r.status_code == 429 and body["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert body["message"].startswith("REQUEST_LIMIT_EXCEEDED:")
    assert "2 calls per minute" in body["message"] and a.name in body["message"]
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 60


def test_endpoint_cap_beats_user_limits(srv: Server, fake: FakeServer) -> None:
    a, b = new_user(srv), new_user(srv)
    endpoint(srv, fake, "rl-endpoint", [
        {"calls": 3, "key": "endpoint", "renewal_period": "minute"},
        {"calls": 10, "key": "user", "principal": a.name, "renewal_period": "minute"},
    ], [a, b])
    assert statuses(a, "rl-endpoint", 2) == [200, 200]
    assert statuses(b, "rl-endpoint", 2) == [200, 429]  # the global cap is full for all
    assert statuses(a, "rl-endpoint", 1) == [429]
    assert "the endpoint limit" in ask(b, "rl-endpoint").json()["message"]


def test_custom_beats_group_beats_default(srv: Server, fake: FakeServer) -> None:
    vip, member, other = new_user(srv), new_user(srv), new_user(srv)
    sp = new_sp(srv)
    group = new_group(srv, [vip.id, member.id, sp.id])
    endpoint(srv, fake, "rl-precedence", [
        {"calls": 1, "key": "user", "renewal_period": "minute"},  # default
        {"calls": 3, "key": "user_group", "principal": group["displayName"],
         "renewal_period": "minute"},
        {"calls": 5, "key": "user", "principal": vip.name, "renewal_period": "minute"},
        {"calls": 2, "key": "service_principal", "principal": sp.name,
         "renewal_period": "minute"},
    ], [vip, member, other, sp])
    assert statuses(other, "rl-precedence", 2) == [200, 429]  # the per-user default
    assert statuses(vip, "rl-precedence", 6) == [200] * 5 + [429]  # its own limit only
    assert statuses(sp, "rl-precedence", 3) == [200, 200, 429]  # its own, not the group's
    # The group bucket is shared: the member gets 3, and the vip's calls did not count.
    assert statuses(member, "rl-precedence", 4) == [200, 200, 200, 429]


def test_several_groups_throttle_only_when_all_are_full(srv: Server, fake: FakeServer) -> None:
    u, v = new_user(srv), new_user(srv)
    g1 = new_group(srv, [u.id, v.id])
    g2 = new_group(srv, [u.id])
    endpoint(srv, fake, "rl-groups", [
        {"calls": 1, "key": "user_group", "principal": g1["displayName"],
         "renewal_period": "minute"},
        {"calls": 2, "key": "user_group", "principal": g2["displayName"],
         "renewal_period": "minute"},
    ], [u, v])
    assert statuses(u, "rl-groups", 4) == [200, 200, 200, 429]  # 1 in g1 + 2 in g2
    assert statuses(v, "rl-groups", 1) == [429]  # g1 (v's only group) is full


def test_tokens_limit_reserved_then_reconciled(srv: Server, fake: FakeServer) -> None:
    """max_tokens is reserved up front; the real (small) usage is what stays charged."""
    u = new_user(srv)
    endpoint(srv, fake, "rl-tokens", [{"tokens": 400, "key": "user",
                                        "renewal_period": "minute"}], [u])
    # prompt bound (~100) + 250 fits once; the answer uses ~20 tokens, so after it is
    # reconciled a second such request fits too (without reconciliation it would not).
    first = ask(u, "rl-tokens", max_tokens=250)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    assert used < 60
    assert ask(u, "rl-tokens", max_tokens=250).status_code == 200
    # A request that alone asks for more than the limit can never fit: 429 saying so.
    r = ask(u, "rl-tokens", max_tokens=1000)
    assert r.status_code == 429 and "lower max_tokens" in r.json()["message"]
    # Without max_tokens the server's default is reserved (and sent upstream as the cap).
    assert ask(u, "rl-tokens", max_tokens=None).status_code == 429


def test_calls_and_tokens_more_restrictive_wins(srv: Server, fake: FakeServer) -> None:
    u = new_user(srv)
    endpoint(srv, fake, "rl-both", [{"calls": 10, "tokens": 300, "key": "user",
                                      "renewal_period": "minute"}], [u])
    # Each request reserves ~100 (prompt bound) + 150 and uses far less: the tokens limit
    # refuses well before the 10 calls, and what was admitted stays within 300 tokens.
    answers = [ask(u, "rl-both", max_tokens=150) for _ in range(10)]
    codes = [r.status_code for r in answers]
    assert codes[0] == 200 and 429 in codes and codes.count(200) < 10
    assert codes == sorted(codes)  # once refused, refused (the window has not moved)
    assert sum(r.json()["usage"]["total_tokens"] for r in answers if r.status_code == 200) <= 300
    assert "300 tokens per minute" in answers[-1].json()["message"]


def test_streams_and_openai_client(srv: Server, fake: FakeServer) -> None:
    u = new_user(srv)
    endpoint(srv, fake, "rl-stream", [{"calls": 2, "key": "user", "renewal_period": "minute"}],
             [u])
    client = openai.OpenAI(base_url=f"{srv.url}/serving-endpoints", api_key=u.token,
                           max_retries=0)
    for _ in range(2):
        chunks = list(client.chat.completions.create(
            model="rl-stream", messages=MSG, max_tokens=8, stream=True))  # type: ignore[arg-type]
        assert chunks and chunks[-1].choices[0].finish_reason is not None
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="rl-stream", messages=MSG,  # type: ignore[arg-type]
                                       max_tokens=8, stream=True)
    assert exc.value.status_code == 429
    assert "REQUEST_LIMIT_EXCEEDED" in str(exc.value)


def test_legacy_rate_limits_enforced(srv: Server, fake: FakeServer) -> None:
    u = new_user(srv)
    endpoint(srv, fake, "rl-legacy", [], [u])
    with srv.client() as c:
        r = c.put("/api/2.0/serving-endpoints/rl-legacy/rate-limits",
                  json={"rate_limits": [{"calls": 1, "key": "user",
                                         "renewal_period": "minute"}]})
        assert r.status_code == 200, r.text
    assert statuses(u, "rl-legacy", 2) == [200, 429]


@pytest.mark.parametrize("limit, field", [
    ({"calls": 0, "key": "user", "renewal_period": "minute"}, "calls"),
    ({"calls": -5, "key": "user", "renewal_period": "minute"}, "calls"),
    ({"calls": 5, "key": "user", "renewal_period": "hour"}, "renewal_period"),
    ({"calls": 5, "key": "team", "renewal_period": "minute"}, "key"),
    ({"calls": 5, "key": "endpoint", "principal": "a@b.c", "renewal_period": "minute"},
     "principal"),
    ({"key": "user", "renewal_period": "minute"}, "calls"),
    ({"calls": 5, "key": "user", "renewal_period": "minute", "burst": 3}, "burst"),
    ({"calls": 5, "key": "user", "principal": "nobody@example.com",
      "renewal_period": "minute"}, "principal"),
    ({"calls": 5, "key": "user_group", "principal": "no-such-group",
      "renewal_period": "minute"}, "principal"),
])
def test_bad_limits_are_400_and_change_nothing(srv: Server, fake: FakeServer,
                                               limit: dict[str, Any], field: str) -> None:
    with srv.client() as c:
        names = {e["name"] for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]}
    if "rl-bad" not in names:
        endpoint(srv, fake, "rl-bad", [{"calls": 7, "key": "endpoint",
                                         "renewal_period": "minute"}], [])
    with srv.client() as c:
        r = c.put("/api/2.0/serving-endpoints/rl-bad/ai-gateway", json={"rate_limits": [limit]})
        assert r.status_code == 400, r.text
        assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert field in r.json()["message"]
        after = c.get("/api/2.0/serving-endpoints/rl-bad").json()
    assert after["ai_gateway"]["rate_limits"] == [{"calls": 7, "key": "endpoint",
                                                   "renewal_period": "minute"}]


def test_sdk_retries_after_a_true_retry_after(srv: Server, fake: FakeServer) -> None:
    """databricks-sdk sleeps for Retry-After on a 429 and tries again: the header is true,
    so the retry (one window later) succeeds."""
    u = new_user(srv)
    endpoint(srv, fake, "rl-sdk", [{"calls": 1, "key": "user", "renewal_period": "minute"}],
             [u])
    w = WorkspaceClient(host=srv.url, token=u.token)
    msg = [ChatMessage(role=ChatMessageRole.USER, content="hi")]
    w.serving_endpoints.query(name="rl-sdk", messages=msg, max_tokens=4)
    started = time.monotonic()
    out = w.serving_endpoints.query(name="rl-sdk", messages=msg, max_tokens=4)
    waited = time.monotonic() - started
    assert out.choices and 55 <= waited <= 75, waited


def test_usage_rows_for_every_request(srv: Server, fake: FakeServer) -> None:
    u = new_user(srv)
    endpoint(srv, fake, "rl-usage", [{"calls": 4, "key": "user", "renewal_period": "minute"}],
             [u], usage=True)
    expected = []
    for i in range(3):
        r = ask(u, "rl-usage", client_request_id=f"req-{i}", usage_context={"team": "a"})
        expected.append((f"req-{i}", r.status_code))
    with u.client() as c:  # streamed
        r = c.post("/serving-endpoints/rl-usage/invocations",
                   json={"messages": MSG, "max_tokens": 8, "stream": True,
                         "client_request_id": "req-stream"})
        assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
        expected.append(("req-stream", 200))
        bad = c.post("/serving-endpoints/rl-usage/invocations",
                     json={"messages": MSG, "temperature": 9, "client_request_id": "req-bad"})
        expected.append(("req-bad", bad.status_code))
    expected.append(("req-429", ask(u, "rl-usage", client_request_id="req-429").status_code))
    assert [s for _, s in expected] == [200, 200, 200, 200, 400, 429]

    def rows() -> list[dict[str, Any]] | None:
        db = open_database(ServerConfig(data_dir=srv.data_dir, database_url=None))
        try:
            got = UsageStore(db).usage("rl-usage")
        finally:
            db.close()
        return got if len(got) >= len(expected) else None

    got = wait_for(rows, 20, "usage rows")
    assert [(r["client_request_id"], r["status_code"]) for r in got] == expected
    ok = got[0]
    assert ok["requester"] == u.name and ok["usage_context"] == {"team": "a"}
    assert ok["input_token_count"] > 0 and ok["output_token_count"] > 0
    assert ok["input_character_count"] == len("hello") and ok["output_character_count"] > 0
    assert ok["served_entity_id"] and len(ok["served_entity_id"]) == 32
    assert got[3]["request_streaming"] is True and got[3]["output_token_count"] > 0
    assert not got[4]["served_entity_id"] and got[5]["output_token_count"] == 0
    db = open_database(ServerConfig(data_dir=srv.data_dir, database_url=None))
    try:
        entities = UsageStore(db).entities("rl-usage")
    finally:
        db.close()
    assert ok["served_entity_id"] in {e["served_entity_id"] for e in entities}
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'fmserve_rate_limited_total{endpoint="rl-usage"} 1.0' in metrics
    out = subprocess.run([*fmserve_cmd(), "usage", "--data-dir", str(srv.data_dir),
                          "--endpoint", "rl-usage"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"}, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if u.name in ln)
    assert "rl-usage" in line and " 6 " in line and " 1 " in line  # 6 requests, 1 429
