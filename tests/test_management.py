"""Endpoint management end to end (spec §2.2–§2.5, §4, §11, §12): the unmodified
databricks-sdk ``WorkspaceClient().serving_endpoints`` and mlflow
``get_deploy_client("databricks")`` create, change, query and delete user endpoints
on a real ``fmserve serve``; traffic splits; request validation.

The module runs its own server (``server`` below overrides the session one): with
one llama.cpp thread per worker, since several SmolLM2 workers at once with one
thread per core each oversubscribe a small machine and stall for seconds. Every
endpoint a test creates is deleted again (the ``cleanup`` fixture). Few endpoints
live at once: each served entity is a llama.cpp / sentence-transformers worker.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CHAT, EMBED, Server, start_server, stop_server, wait_for
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import (
    BadRequest,
    InvalidParameterValue,
    NotFound,
    OperationFailed,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
)
from databricks.sdk.service.serving import (
    AiGatewayConfig,
    AiGatewayGuardrailParameters,
    AiGatewayGuardrails,
    AiGatewayRateLimit,
    AiGatewayRateLimitKey,
    AiGatewayRateLimitRenewalPeriod,
    AiGatewayUsageTrackingConfig,
    ChatMessage,
    ChatMessageRole,
    EndpointCoreConfigInput,
    EndpointTag,
    FallbackConfig,
    RateLimit,
    RateLimitKey,
    RateLimitRenewalPeriod,
    Route,
    ServedEntityInput,
    TrafficConfig,
)

from fmserve.engines.bundled import minilm_folder, smollm2_gguf

SMOL = "system.ai.smollm2-135m-instruct"
MINILM = "system.ai.all-minilm-l6-v2"
API = "/api/2.0/serving-endpoints"
WAIT = timedelta(minutes=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("mgmt"), {"FMSERVE_LLAMA_THREADS": "1"})
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture()
def ws(server: Server) -> WorkspaceClient:
    return WorkspaceClient(host=server.url, token=server.token)


@pytest.fixture()
def cleanup(server: Server) -> Iterator[list[str]]:
    """Names appended here are deleted after the test (404 = already gone)."""
    names: list[str] = []
    yield names
    with server.client() as c:
        for name in names:
            r = c.delete(f"{API}/{name}")
            assert r.status_code in (200, 404), r.text


def _entity(name: str, entity_name: str = SMOL) -> ServedEntityInput:
    return ServedEntityInput(name=name, entity_name=entity_name)


def _split(**pct: int) -> TrafficConfig:
    return TrafficConfig(routes=[Route(served_entity_name=n, traffic_percentage=p)
                                 for n, p in pct.items()])



def _chat_body(max_tokens: int = 1) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens,
            "temperature": 0}


def _assert_error(r: httpx.Response, status: int, code: str, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error_code", "message"}, body
    assert body["error_code"] == code, body
    for needle in needles:
        assert needle.lower() in body["message"].lower(), (needle, body["message"])
    return body


# -- a 90/10 endpoint shared by the read-mostly tests ---------------------------------

AB = "mgmt-ab"


@pytest.fixture(scope="module")
def ab(server: Server) -> Iterator[str]:
    """``mgmt-ab``: two SmolLM2 entities, ``current`` 90 % / ``challenger`` 10 %."""
    ws = WorkspaceClient(host=server.url, token=server.token)
    ep = ws.serving_endpoints.create_and_wait(
        name=AB,
        config=EndpointCoreConfigInput(
            name=AB, served_entities=[_entity("current"), _entity("challenger")],
            traffic_config=_split(current=90, challenger=10)),
        tags=[EndpointTag(key="team", value="search"), EndpointTag(key="stage", value="dev")],
        timeout=WAIT)
    assert ep.name == AB
    try:
        yield AB
    finally:
        with server.client() as c:
            c.delete(f"{API}/{AB}")


def test_sdk_create_and_wait(ab: str, ws: WorkspaceClient) -> None:
    ep = ws.serving_endpoints.get(ab)
    assert ep.name == ab
    assert ep.id and len(ep.id) >= 16
    assert ep.creator == "admin@fmserve.local"  # the token's owner: the first admin
    assert ep.task == "llm/v1/chat"
    assert ep.permission_level is not None and ep.permission_level.value == "CAN_MANAGE"
    assert ep.creation_timestamp and ep.creation_timestamp > 1_600_000_000_000  # ms
    assert ep.state is not None
    assert ep.state.ready is not None and ep.state.ready.value == "READY"
    assert ep.state.config_update is not None
    assert ep.state.config_update.value == "NOT_UPDATING"
    assert ep.pending_config is None
    assert ep.config is not None and ep.config.config_version == 1
    entities = {e.name: e for e in ep.config.served_entities or []}
    assert set(entities) == {"current", "challenger"}
    for e in entities.values():
        assert e.entity_name == SMOL
        assert e.state is not None and e.state.deployment is not None
        assert e.state.deployment.value == "DEPLOYMENT_READY"
        assert e.foundation_model is not None
        assert e.foundation_model.name == "smollm2-135m-instruct"
    assert ep.config.traffic_config is not None
    routes = {r.served_entity_name: r.traffic_percentage
              for r in ep.config.traffic_config.routes or []}
    assert routes == {"current": 90, "challenger": 10}
    assert {(t.key, t.value) for t in ep.tags or []} == {("team", "search"), ("stage", "dev")}


def test_sdk_list_contains_created(ab: str, ws: WorkspaceClient) -> None:
    eps = {e.name: e for e in ws.serving_endpoints.list()}
    assert {ab, CHAT, EMBED} <= set(eps)
    ep = eps[ab]
    assert ep.task == "llm/v1/chat"
    assert ep.creator == "admin@fmserve.local"
    assert ep.state is not None and ep.state.ready is not None
    assert ep.state.ready.value == "READY"
    assert ep.config is not None
    assert {e.name for e in ep.config.served_entities or []} == {"current", "challenger"}


def test_sdk_query_routes_to_an_entity(ab: str, ws: WorkspaceClient) -> None:
    msgs = [ChatMessage(role=ChatMessageRole.USER, content="Say hi.")]
    seen = set()
    for _ in range(5):
        r = ws.serving_endpoints.query(name=ab, messages=msgs, max_tokens=4, temperature=0)
        assert r.choices and r.choices[0].message is not None
        assert r.choices[0].message.content
        assert r.served_model_name in ("current", "challenger")
        seen.add(r.served_model_name)
    assert seen


def test_entity_level_invocations(ab: str, server: Server, http: httpx.Client) -> None:
    for entity in ("challenger", "current"):
        for _ in range(4):
            r = http.post(f"/serving-endpoints/{ab}/served-models/{entity}/invocations",
                          json=_chat_body(2))
            assert r.status_code == 200, r.text
            assert r.headers["served-model-name"] == entity
            assert r.json()["choices"][0]["message"]["content"] is not None
    r = http.post(f"/serving-endpoints/{ab}/served-models/nobody/invocations",
                  json=_chat_body())
    _assert_error(r, 404, "RESOURCE_DOES_NOT_EXIST", "nobody")


def test_traffic_split_90_10(ab: str, server: Server) -> None:
    """1,000 endpoint-level queries: the 10 % entity's share is binomially plausible."""
    n, p = 1000, 0.10
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {server.token}"},
                      limits=httpx.Limits(max_connections=4)) as c:
        def one(_: int) -> str:
            r = c.post(f"/serving-endpoints/{ab}/invocations",
                       json={"prompt": "a", "max_tokens": 1, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.headers["served-model-name"]

        with ThreadPoolExecutor(4) as pool:
            counts = Counter(pool.map(one, range(n)))
    assert set(counts) == {"current", "challenger"}, counts
    assert sum(counts.values()) == n
    # 99.9 % two-sided binomial interval: 100 ± 3.29·sqrt(1000·0.1·0.9) ≈ [69, 131].
    half = 3.29 * math.sqrt(n * p * (1 - p))
    assert n * p - half <= counts["challenger"] <= n * p + half, counts


def test_sdk_build_logs_and_logs(ab: str, ws: WorkspaceClient) -> None:
    build = ws.serving_endpoints.build_logs(ab, "current")
    assert build.logs and "worker" in build.logs.lower()
    logs = ws.serving_endpoints.logs(ab, "challenger")
    assert logs.logs and "worker" in logs.logs.lower()
    with pytest.raises(NotFound):
        ws.serving_endpoints.logs(ab, "nobody")


def test_sdk_export_metrics_and_openapi(ab: str, ws: WorkspaceClient) -> None:
    # at least one query so request counters exist for the endpoint
    ws.serving_endpoints.query(name=ab, prompt="a", max_tokens=1)
    metrics = ws.serving_endpoints.export_metrics(ab)
    assert metrics.contents is not None
    text = metrics.contents.read().decode()
    assert "# TYPE" in text and ab in text
    assert CHAT not in text  # only this endpoint's series
    doc = ws.serving_endpoints.get_open_api(ab)
    assert doc.contents is not None
    openapi = doc.contents.read().decode()
    assert '"openapi"' in openapi and ab in openapi


def test_sdk_put_ai_gateway(ab: str, ws: WorkspaceClient) -> None:
    sent = dict(
        usage_tracking_config=AiGatewayUsageTrackingConfig(enabled=True),
        rate_limits=[AiGatewayRateLimit(renewal_period=AiGatewayRateLimitRenewalPeriod.MINUTE,
                                        calls=100_000, key=AiGatewayRateLimitKey.USER)],
        guardrails=AiGatewayGuardrails(input=AiGatewayGuardrailParameters(
            invalid_keywords=["forbidden"], safety=False)),
        fallback_config=FallbackConfig(enabled=True))
    r = ws.serving_endpoints.put_ai_gateway(ab, **sent)
    expected = AiGatewayConfig(**sent).as_dict()
    assert r.as_dict() == expected
    ep = ws.serving_endpoints.get(ab)
    assert ep.ai_gateway is not None and ep.ai_gateway.as_dict() == expected
    # still serves with the gateway settings in place
    q = ws.serving_endpoints.query(name=ab, prompt="a", max_tokens=1)
    assert q.served_model_name in ("current", "challenger")


def test_sdk_patch_tags(ab: str, ws: WorkspaceClient) -> None:
    r = ws.serving_endpoints.patch(ab, add_tags=[EndpointTag(key="owner", value="ml"),
                                                 EndpointTag(key="team", value="ranking")],
                                   delete_tags=["stage"])
    tags = {(t.key, t.value) for t in r.tags or []}
    assert tags == {("team", "ranking"), ("owner", "ml")}
    ep = ws.serving_endpoints.get(ab)
    assert {(t.key, t.value) for t in ep.tags or []} == tags
    # deleting a key that is not there is not an error
    r = ws.serving_endpoints.patch(ab, delete_tags=["owner", "never-there"])
    assert {(t.key, t.value) for t in r.tags or []} == {("team", "ranking")}


# put() is deprecated ("use AI Gateway"); ignore only that warning, should the SDK emit one.
@pytest.mark.filterwarnings("ignore:.*AI Gateway.*:DeprecationWarning")
def test_sdk_put_rate_limits_legacy(ab: str, ws: WorkspaceClient, http: httpx.Client) -> None:
    limits = [RateLimit(calls=100_000, renewal_period=RateLimitRenewalPeriod.MINUTE,
                        key=RateLimitKey.ENDPOINT)]
    r = ws.serving_endpoints.put(ab, rate_limits=limits)
    assert [x.as_dict() for x in r.rate_limits or []] == [x.as_dict() for x in limits]
    got = http.get(f"{API}/{ab}").json()
    assert got["rate_limits"] == [x.as_dict() for x in limits]


# -- update, delete -------------------------------------------------------------------


def test_sdk_update_config_keeps_serving_then_delete(ws: WorkspaceClient, server: Server,
                                                      cleanup: list[str]) -> None:
    name = "mgmt-upd"
    cleanup.append(name)
    ws.serving_endpoints.create_and_wait(
        name=name, config=EndpointCoreConfigInput(name=name, served_entities=[_entity("v1")]),
        timeout=WAIT)

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def fire() -> None:
        with server.client() as c:
            while not stop.is_set():
                r = c.post(f"/serving-endpoints/{name}/invocations",
                           json={"prompt": "a", "max_tokens": 1})
                results.append((r.status_code, r.headers.get("served-model-name", r.text)))

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(results) >= 3, 60, "queries before the update")
        # a path to a .gguf file is an entity too
        waiter = ws.serving_endpoints.update_config(
            name, served_entities=[_entity("v2a", str(smollm2_gguf())), _entity("v2b")],
            traffic_config=_split(v2a=50, v2b=50))
        pending = waiter.response
        assert pending.name == name
        assert pending.state is not None and pending.state.config_update is not None
        assert pending.state.config_update.value == "IN_PROGRESS"
        assert pending.config is not None and pending.config.config_version == 1
        assert pending.pending_config is not None
        assert pending.pending_config.config_version == 2
        assert {e.name for e in pending.pending_config.served_entities or []} == {"v2a", "v2b"}
        # a second update while the first rolls out is refused; nothing changes
        with server.client() as c:
            r = c.put(f"{API}/{name}/config",
                      json={"served_entities": [{"name": "v3", "entity_name": SMOL}]})
        _assert_error(r, 400, "INVALID_STATE", "already being updated")
        ep = waiter.result(timeout=WAIT)
        n_at_switch = len(results)
        wait_for(lambda: len(results) >= n_at_switch + 3, 60, "queries after the update")
    finally:
        stop.set()
        t.join(30)
    assert ep.config is not None and ep.config.config_version == 2
    assert {e.name for e in ep.config.served_entities or []} == {"v2a", "v2b"}
    assert ep.pending_config is None
    assert ep.state is not None and ep.state.config_update is not None
    assert ep.state.config_update.value == "NOT_UPDATING"
    failed = [x for x in results if x[0] != 200]
    assert not failed, failed[:5]
    served = Counter(n for _, n in results)
    assert served["v1"] > 0 and set(served) <= {"v1", "v2a", "v2b"}, served
    assert results[-1][1] in ("v2a", "v2b")
    entity = {e.name: e for e in ep.config.served_entities or []}["v2a"]
    assert entity.entity_name == str(smollm2_gguf())
    assert entity.state is not None and entity.state.deployment is not None
    assert entity.state.deployment.value == "DEPLOYMENT_READY"

    # delete: gone from get and list; queries 404
    ws.serving_endpoints.delete(name)
    with pytest.raises(ResourceDoesNotExist):
        ws.serving_endpoints.get(name)
    assert name not in {e.name for e in ws.serving_endpoints.list()}
    with server.client() as c:
        r = c.post(f"/serving-endpoints/{name}/invocations", json=_chat_body())
        _assert_error(r, 404, "RESOURCE_DOES_NOT_EXIST", name)
        _assert_error(c.delete(f"{API}/{name}"), 404, "RESOURCE_DOES_NOT_EXIST", name)


def test_embeddings_endpoint_from_folder(ws: WorkspaceClient, http: httpx.Client,
                                         cleanup: list[str]) -> None:
    name = "mgmt-embed"
    cleanup.append(name)
    folder = str(minilm_folder())
    ep = ws.serving_endpoints.create_and_wait(
        name=name, config=EndpointCoreConfigInput(
            name=name, served_entities=[ServedEntityInput(name="minilm", entity_name=folder)]),
        timeout=WAIT)
    assert ep.task == "llm/v1/embeddings"
    assert ep.config is not None
    assert (ep.config.served_entities or [])[0].entity_name == folder
    r = http.post(f"/serving-endpoints/{name}/invocations",
                  json={"input": ["first sentence", "second one"]})
    assert r.status_code == 200, r.text
    assert r.headers["served-model-name"] == "minilm"
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(len(d["embedding"]) == 384 for d in data)
    # a chat request to an embeddings endpoint is a 400, not a 500
    _assert_error(http.post(f"/serving-endpoints/{name}/invocations", json=_chat_body()),
                  400, "INVALID_PARAMETER_VALUE", "llm/v1/embeddings")


# -- mlflow deployments ---------------------------------------------------------------


@pytest.fixture()
def deploy(server: Server, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", server.token)
    return get_deploy_client("databricks")


def test_mlflow_endpoint_lifecycle(deploy: Any, cleanup: list[str]) -> None:
    name = "mgmt-mlflow"
    cleanup.append(name)
    created = deploy.create_endpoint(config={
        "name": name,
        "config": {"served_entities": [{"name": "m1", "entity_name": SMOL}]},
        "tags": [{"key": "via", "value": "mlflow"}]})
    assert created["name"] == name
    assert created["state"]["config_update"] == "IN_PROGRESS"

    def ready() -> dict[str, Any] | None:
        ep = deploy.get_endpoint(endpoint=name)
        st = ep["state"]
        return ep if st["ready"] == "READY" and st["config_update"] == "NOT_UPDATING" else None

    ep = wait_for(ready, 120, "mlflow-created endpoint READY")
    assert ep["config"]["config_version"] == 1
    assert ep["tags"] == [{"key": "via", "value": "mlflow"}]
    assert name in {e["name"] for e in deploy.list_endpoints()}

    r = deploy.predict(endpoint=name, inputs=_chat_body(3))
    assert r["choices"][0]["message"]["content"] is not None

    upd = deploy.update_endpoint_config(endpoint=name, config={
        "served_entities": [{"name": "m2", "entity_name": SMOL}]})
    assert upd["name"] == name
    ep = wait_for(lambda: (e := ready()) and e["config"]["config_version"] == 2 and e,
                   120, "mlflow update rolled out")
    assert [e["name"] for e in ep["config"]["served_entities"]] == ["m2"]
    r = deploy.predict(endpoint=name, inputs={"prompt": "a", "max_tokens": 1})
    assert r["choices"]

    assert deploy.delete_endpoint(endpoint=name) == {}
    assert name not in {e["name"] for e in deploy.list_endpoints()}


# -- failures -------------------------------------------------------------------------


def test_invalid_gguf_fails_deployment(ws: WorkspaceClient, http: httpx.Client,
                                       tmp_path: Path, cleanup: list[str]) -> None:
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"this is not a gguf file\x00\x01\x02" * 64)
    name = "mgmt-junk"
    cleanup.append(name)
    body = {"name": name, "config": {"served_entities": [{"name": "junk",
                                                           "entity_name": str(junk)}]}}
    r = http.post(API, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["state"]["config_update"] == "IN_PROGRESS"

    with pytest.raises(OperationFailed):  # fails fast on UPDATE_FAILED
        ws.serving_endpoints.wait_get_serving_endpoint_not_updating(name, timeout=WAIT)
    ep = http.get(f"{API}/{name}").json()
    assert ep["state"] == {"ready": "NOT_READY", "config_update": "UPDATE_FAILED"}
    entity = ep["pending_config"]["served_entities"][0]
    assert entity["name"] == "junk"
    assert entity["state"]["deployment"] == "DEPLOYMENT_FAILED"
    message = entity["state"]["deployment_state_message"]
    assert "x.gguf" in message or "load" in message.lower(), message  # the loader's message
    # the failed entity's build log holds the loader's traceback
    build = ws.serving_endpoints.build_logs(name, "junk").logs or ""
    assert "Traceback" in build or "x.gguf" in build, build[-2000:]
    # queries get a clean error, and the server and other endpoints keep working
    r = http.post(f"/serving-endpoints/{name}/invocations", json=_chat_body())
    assert 400 <= r.status_code < 600 and r.status_code != 500, r.text
    assert set(r.json()) >= {"error_code", "message"}
    r = http.post(f"/serving-endpoints/{CHAT}/invocations", json=_chat_body(2))
    assert r.status_code == 200, r.text

    # a new config fixes the failed endpoint
    r = http.put(f"{API}/{name}/config",
                 json={"served_entities": [{"name": "fixed", "entity_name": SMOL}]})
    assert r.status_code == 200, r.text
    ep = ws.serving_endpoints.wait_get_serving_endpoint_not_updating(name, timeout=WAIT)
    assert ep.state is not None and ep.state.ready is not None
    assert ep.state.ready.value == "READY"
    assert ep.config is not None
    assert [e.name for e in ep.config.served_entities or []] == ["fixed"]
    r = http.post(f"/serving-endpoints/{name}/invocations", json=_chat_body())
    assert r.status_code == 200 and r.headers["served-model-name"] == "fixed", r.text

    with pytest.raises(OperationFailed):  # a failing update: old config keeps serving
        ws.serving_endpoints.update_config_and_wait(
            name, served_entities=[ServedEntityInput(name="junk2", entity_name=str(junk))],
            timeout=WAIT)
    ep2 = http.get(f"{API}/{name}").json()
    assert ep2["state"] == {"ready": "READY", "config_update": "UPDATE_FAILED"}
    assert [e["name"] for e in ep2["config"]["served_entities"]] == ["fixed"]
    failed = ep2["pending_config"]["served_entities"][0]
    assert failed["state"]["deployment"] == "DEPLOYMENT_FAILED"
    r = http.post(f"/serving-endpoints/{name}/invocations", json=_chat_body())
    assert r.status_code == 200 and r.headers["served-model-name"] == "fixed", r.text


def test_sdk_create_duplicate_name(ab: str, ws: WorkspaceClient, http: httpx.Client) -> None:
    before = http.get(f"{API}/{ab}").json()
    with pytest.raises(ResourceAlreadyExists) as ei:
        ws.serving_endpoints.create(name=ab, config=EndpointCoreConfigInput(
            name=ab, served_entities=[_entity("other")]))
    assert ab in str(ei.value)
    after = http.get(f"{API}/{ab}").json()
    assert after["config"] == before["config"] and after["id"] == before["id"]
    # a bundled endpoint's name is taken too
    r = http.post(API, json={"name": CHAT, "config": {"served_entities": [{"entity_name": SMOL}]}})
    _assert_error(r, 409, "RESOURCE_ALREADY_EXISTS", CHAT)


def _one(entity_name: str = SMOL, name: str = "e") -> dict[str, Any]:
    return {"name": name, "entity_name": entity_name}


INVALID_CREATES = [
    pytest.param({"name": "bad name!", "config": {"served_entities": [_one()]}},
                 "name", id="name-with-space"),
    pytest.param({"name": "", "config": {"served_entities": [_one()]}}, "name", id="name-empty"),
    pytest.param({"name": "a" * 64, "config": {"served_entities": [_one()]}}, "name",
                 id="name-64-chars"),
    pytest.param({"name": "-leading", "config": {"served_entities": [_one()]}}, "name",
                 id="name-leading-dash"),
    pytest.param({"config": {"served_entities": [_one()]}}, "name", id="name-missing"),
    pytest.param({"name": "mgmt-bad"}, "config", id="config-missing"),
    pytest.param({"name": "mgmt-bad", "config": {}}, "served_entities", id="no-entities"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name="a"), _one(name="b")],
        "traffic_config": {"routes": [{"served_entity_name": "a", "traffic_percentage": 60},
                                      {"served_entity_name": "b", "traffic_percentage": 30}]}}},
        "sum to 100", id="traffic-not-100"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name="a"), _one(name="b")]}},
        "traffic_config", id="two-entities-no-routes"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name="a")],
        "traffic_config": {"routes": [{"served_entity_name": "ghost",
                                       "traffic_percentage": 100}]}}},
        "ghost", id="route-unknown-entity"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name="a")],
        "traffic_config": {"routes": [{"served_entity_name": "a",
                                       "traffic_percentage": 101}]}}},
        "traffic_percentage", id="route-over-100"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name="a"), _one(name="a")],
        "traffic_config": {"routes": [{"served_entity_name": "a", "traffic_percentage": 100}]}}},
        "unique", id="duplicate-entity-names"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(name=f"e{i}") for i in range(16)],
        "traffic_config": {"routes": [{"served_entity_name": "e0", "traffic_percentage": 100}]}}},
        "15", id="16-entities"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one(SMOL, "chat"), _one(MINILM, "emb")],
        "traffic_config": {"routes": [{"served_entity_name": "chat", "traffic_percentage": 50},
                                      {"served_entity_name": "emb", "traffic_percentage": 50}]}}},
        "task", id="mixed-tasks"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [_one("system.ai.nope")]}},
                 "system.ai.nope", id="unknown-system-model"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one("/nonexistent/dir/model.gguf")]}},
        "/nonexistent/dir/model.gguf", id="missing-gguf-path"),
    pytest.param({"name": "mgmt-bad", "config": {
        "served_entities": [_one("/nonexistent/st-folder")]}},
        "/nonexistent/st-folder", id="unknown-path"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [{"name": "x"}]}},
                 "entity_name", id="no-entity-name"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [{
        "name": "palm", "external_model": {
            "name": "chat-bison", "provider": "palm", "task": "llm/v1/chat",
            "palm_config": {"palm_api_key_plaintext": "k"}}}]}},
        "palm", id="unsupported-provider"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [{
        "name": "gpt", "external_model": {
            "name": "gpt-4o", "provider": "openai", "task": "llm/v1/chat",
            "anthropic_config": {"anthropic_api_key_plaintext": "k"}}}]}},
        "openai_config", id="external-wrong-config"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [{
        "name": "gpt", "entity_name": "system.ai.smollm2-135m-instruct", "external_model": {
            "name": "gpt-4o", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "k"}}}]}},
        "external_model cannot be combined", id="external-and-local"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": "nope"}},
                 "served_entities", id="entities-not-a-list"),
    pytest.param({"name": "mgmt-bad", "config": {"served_entities": [{
        **_one(), "environment_vars": {"FMSERVE_LLAMA_WEIGHTS": "q3_zz"}}]}},
        "FMSERVE_LLAMA_WEIGHTS", id="unknown-weights-type"),
]


@pytest.mark.parametrize(("body", "needle"), INVALID_CREATES)
def test_create_rejects_invalid(body: dict[str, Any], needle: str, http: httpx.Client) -> None:
    names = sorted(e["name"] for e in http.get(API).json()["endpoints"])
    r = http.post(API, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _assert_error(r, 400, r.json().get("error_code", "?"), needle)
    assert r.json()["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert sorted(e["name"] for e in http.get(API).json()["endpoints"]) == names


def test_create_rejects_non_json(http: httpx.Client) -> None:
    r = http.post(API, content=b"{not json", headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()) >= {"error_code", "message"}
    r = http.post(API, json=["a", "list"])
    assert 400 <= r.status_code < 500 and set(r.json()) >= {"error_code", "message"}


def test_sdk_maps_validation_errors(ws: WorkspaceClient) -> None:
    with pytest.raises(InvalidParameterValue) as ei:
        ws.serving_endpoints.create(name="mgmt-bad", config=EndpointCoreConfigInput(
            name="mgmt-bad", served_entities=[_entity("x", "system.ai.nope")]))
    assert isinstance(ei.value, BadRequest)
    assert "system.ai.nope" in str(ei.value)


def test_update_config_rejects_invalid(ab: str, ws: WorkspaceClient,
                                       http: httpx.Client) -> None:
    before = http.get(f"{API}/{ab}").json()
    # unknown endpoint
    with pytest.raises(ResourceDoesNotExist):
        ws.serving_endpoints.update_config("no-such-endpoint",
                                           served_entities=[_entity("x")])
    _assert_error(http.put(f"{API}/no-such-endpoint/config",
                           json={"served_entities": [_one()]}),
                  404, "RESOURCE_DOES_NOT_EXIST", "no-such-endpoint")
    # a task change
    _assert_error(http.put(f"{API}/{ab}/config", json={"served_entities": [_one(MINILM)]}),
                  400, "INVALID_PARAMETER_VALUE", "llm/v1/chat", "llm/v1/embeddings")
    # bad routes, unknown model, nothing at all
    _assert_error(http.put(f"{API}/{ab}/config", json={
        "served_entities": [_one(name="a"), _one(name="b")],
        "traffic_config": {"routes": [{"served_entity_name": "a", "traffic_percentage": 10}]}}),
        400, "INVALID_PARAMETER_VALUE", "100")
    _assert_error(http.put(f"{API}/{ab}/config",
                           json={"served_entities": [_one("system.ai.nope")]}),
                  400, "INVALID_PARAMETER_VALUE", "system.ai.nope")
    _assert_error(http.put(f"{API}/{ab}/config", json={}), 400, "INVALID_PARAMETER_VALUE",
                  "served_entities")
    after = http.get(f"{API}/{ab}").json()
    assert after["config"] == before["config"]
    assert after["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    assert "pending_config" not in after


def test_other_operations_on_unknown_endpoint(http: httpx.Client) -> None:
    for method, path, body in (
            ("DELETE", "", None), ("PATCH", "/tags", {"add_tags": [{"key": "k"}]}),
            ("PUT", "/ai-gateway", {}), ("PUT", "/rate-limits", {"rate_limits": []}),
            ("GET", "/metrics", None), ("GET", "/openapi", None),
            ("GET", "/served-models/x/logs", None), ("GET", "/served-models/x/build-logs", None)):
        r = http.request(method, f"{API}/no-such-endpoint{path}", json=body)
        _assert_error(r, 404, "RESOURCE_DOES_NOT_EXIST", "no-such-endpoint")


@pytest.mark.parametrize("builtin", [CHAT, EMBED])
def test_builtin_endpoints_cannot_be_changed(builtin: str, http: httpx.Client) -> None:
    before = http.get(f"{API}/{builtin}").json()
    for method, path, body in (
            ("DELETE", "", None),
            ("PATCH", "/tags", {"add_tags": [{"key": "k", "value": "v"}]}),
            ("PUT", "/config", {"served_entities": [_one(SMOL if builtin == CHAT else MINILM)]}),
            ("PUT", "/ai-gateway", {"usage_tracking_config": {"enabled": True}}),
            ("PUT", "/rate-limits", {"rate_limits": [{"calls": 1, "renewal_period": "minute"}]})):
        r = http.request(method, f"{API}/{builtin}{path}", json=body)
        _assert_error(r, 400, "INVALID_PARAMETER_VALUE", "built-in")
    after = http.get(f"{API}/{builtin}").json()
    assert after == before
    r = http.post(f"/serving-endpoints/{CHAT}/invocations", json=_chat_body(2))
    assert r.status_code == 200, r.text


def test_invalid_tags_and_gateway_bodies(ab: str, http: httpx.Client) -> None:
    before = http.get(f"{API}/{ab}").json()
    _assert_error(http.patch(f"{API}/{ab}/tags", json={"add_tags": [{"value": "no key"}]}),
                  400, "INVALID_PARAMETER_VALUE", "key")
    _assert_error(http.put(f"{API}/{ab}/ai-gateway", json={
        "rate_limits": [{"calls": 5, "renewal_period": "hour"}]}),
        400, "INVALID_PARAMETER_VALUE", "renewal_period")
    _assert_error(http.put(f"{API}/{ab}/rate-limits", json={
        "rate_limits": [{"calls": -1, "renewal_period": "minute"}]}),
        400, "INVALID_PARAMETER_VALUE", "calls")
    after = http.get(f"{API}/{ab}").json()
    assert after.get("tags") == before.get("tags")
    assert after.get("ai_gateway") == before.get("ai_gateway")
    assert after.get("rate_limits") == before.get("rate_limits")
