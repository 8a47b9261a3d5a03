"""databricks-sdk ``WorkspaceClient`` and mlflow ``get_deploy_client("databricks")``,
unmodified, against a real ``fmserve serve`` (spec §2, §3.5, §4).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from conftest import CHAT, EMBED, Server
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import NotFound, ResourceDoesNotExist
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole


@pytest.fixture()
def ws(server: Server) -> WorkspaceClient:
    return WorkspaceClient(host=server.url, token=server.token)


# -- databricks-sdk ----------------------------------------------------------------


def test_sdk_list_endpoints(ws: WorkspaceClient) -> None:
    eps = {ep.name: ep for ep in ws.serving_endpoints.list()}
    assert {CHAT, EMBED} <= set(eps)
    assert eps[CHAT].task == "llm/v1/chat"
    assert eps[EMBED].task == "llm/v1/embeddings"
    for name in (CHAT, EMBED):
        ep = eps[name]
        assert ep.id
        assert ep.state is not None and ep.state.ready is not None
        assert ep.state.ready.value == "READY"


def test_sdk_get_endpoint(ws: WorkspaceClient) -> None:
    for name, task in ((CHAT, "llm/v1/chat"), (EMBED, "llm/v1/embeddings")):
        ep = ws.serving_endpoints.get(name)
        assert ep.name == name
        assert ep.task == task
        assert ep.state is not None and ep.state.ready is not None
        assert ep.state.ready.value == "READY"
        assert ep.state.config_update is not None
        assert ep.state.config_update.value == "NOT_UPDATING"
        assert ep.config is not None and ep.config.served_entities
        entity = ep.config.served_entities[0]
        assert entity.foundation_model is not None
        assert entity.foundation_model.name
        assert entity.state is not None and entity.state.deployment is not None
        assert entity.state.deployment.value == "DEPLOYMENT_READY"


def test_sdk_get_unknown_endpoint(ws: WorkspaceClient) -> None:
    with pytest.raises(ResourceDoesNotExist) as ei:
        ws.serving_endpoints.get("no-such-endpoint")
    assert isinstance(ei.value, NotFound)
    assert "no-such-endpoint" in str(ei.value)


def test_sdk_query_chat(ws: WorkspaceClient) -> None:
    msgs = [ChatMessage(role=ChatMessageRole.USER, content="What is 2 + 2?")]
    r = ws.serving_endpoints.query(name=CHAT, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices and r.choices[0].message is not None
    text = r.choices[0].message.content
    assert text and text.strip()
    assert r.served_model_name == CHAT  # from the served-model-name response header
    assert r.object is not None and r.object.value == "chat.completion"
    assert r.usage is not None
    assert r.usage.prompt_tokens and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens is not None and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = ws.serving_endpoints.query(name=CHAT, messages=msgs, max_tokens=12, temperature=0)
    assert again.choices and again.choices[0].message is not None
    assert again.choices[0].message.content == text


def test_sdk_query_completions_prompt(ws: WorkspaceClient) -> None:
    r = ws.serving_endpoints.query(name=CHAT, prompt="The sky is", max_tokens=6, temperature=0)
    assert r.choices and r.choices[0].text and r.choices[0].text.strip()
    assert r.usage is not None and r.usage.completion_tokens is not None
    assert 0 < r.usage.completion_tokens <= 6


def test_sdk_query_embeddings(ws: WorkspaceClient) -> None:
    r = ws.serving_endpoints.query(name=EMBED, input=["first sentence", "second sentence"])
    assert r.data is not None and len(r.data) == 2
    assert [d.index for d in r.data] == [0, 1]
    for d in r.data:
        assert d.embedding is not None and len(d.embedding) == 384
        assert all(isinstance(x, float) for x in d.embedding)
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, abs_tol=1e-3)
    assert r.data[0].embedding != r.data[1].embedding
    assert r.served_model_name == EMBED
    assert r.usage is not None and r.usage.prompt_tokens and r.usage.prompt_tokens > 0


def test_sdk_query_unknown_endpoint(ws: WorkspaceClient) -> None:
    with pytest.raises(NotFound):
        ws.serving_endpoints.query(name="no-such-endpoint", input="x")


# get_open_ai_client() is deprecated since databricks-sdk 0.88 (stacklevel=2 attributes
# the warning to this test module, so the global databricks.* filter does not apply).
@pytest.mark.filterwarnings("ignore:get_open_ai_client\\(\\) is deprecated:DeprecationWarning")
def test_sdk_get_open_ai_client_chat(ws: WorkspaceClient) -> None:
    client = ws.serving_endpoints.get_open_ai_client(max_retries=0)
    try:
        assert str(client.base_url).rstrip("/").endswith("/serving-endpoints")
        r = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8, temperature=0)
        assert r.choices[0].message.content and r.choices[0].message.content.strip()
        assert r.model == CHAT
        assert r.usage is not None and 0 < r.usage.completion_tokens <= 8
        emb = client.embeddings.create(model=EMBED, input="hello")
        assert len(emb.data[0].embedding) == 384
    finally:
        client.close()


# -- mlflow deployments ------------------------------------------------------------


@pytest.fixture()
def deploy(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", server.token)
    client = get_deploy_client("databricks")
    assert type(client).__name__ == "DatabricksDeploymentClient"
    yield client


def test_mlflow_predict_chat(deploy) -> None:  # type: ignore[no-untyped-def]
    r = deploy.predict(endpoint=CHAT, inputs={
        "messages": [{"role": "user", "content": "What color is the sky?"}],
        "max_tokens": 10, "temperature": 0})
    assert r["object"] == "chat.completion"
    assert r["model"] == CHAT
    text = r["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip()
    u = r["usage"]
    assert 0 < u["completion_tokens"] <= 10
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_mlflow_predict_embeddings(deploy) -> None:  # type: ignore[no-untyped-def]
    r = deploy.predict(endpoint=EMBED, inputs={"input": ["a", "b", "c"]})
    assert r["object"] == "list"
    assert [d["index"] for d in r["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 384 for d in r["data"])
    assert r["usage"]["prompt_tokens"] > 0


def test_mlflow_predict_stream(deploy) -> None:  # type: ignore[no-untyped-def]
    inputs = {"messages": [{"role": "user", "content": "Count to five."}],
              "max_tokens": 12, "temperature": 0}
    chunks = list(deploy.predict_stream(endpoint=CHAT, inputs=inputs))
    assert len(chunks) >= 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < chunks[-1]["usage"]["completion_tokens"] <= 12
    # Same answer as the non-streamed call at temperature 0.
    full = deploy.predict(endpoint=CHAT, inputs=inputs)
    assert full["choices"][0]["message"]["content"] == text


def test_mlflow_predict_stream_completions(deploy) -> None:  # type: ignore[no-untyped-def]
    chunks = list(deploy.predict_stream(endpoint=CHAT, inputs={
        "prompt": "Roses are red,", "max_tokens": 8, "temperature": 0}))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_mlflow_list_and_get_endpoints(deploy) -> None:  # type: ignore[no-untyped-def]
    eps = deploy.list_endpoints()
    by_name = {ep["name"]: ep for ep in eps}
    assert {CHAT, EMBED} <= set(by_name)
    assert by_name[CHAT]["task"] == "llm/v1/chat"
    ep = deploy.get_endpoint(endpoint=EMBED)
    assert ep["name"] == EMBED
    assert ep["task"] == "llm/v1/embeddings"
    assert ep["state"]["ready"] == "READY"
    assert ep["config"]["served_entities"][0]["foundation_model"]["name"]


def test_mlflow_predict_unknown_endpoint(deploy) -> None:  # type: ignore[no-untyped-def]
    # mlflow surfaces HTTP errors as requests.HTTPError carrying the response body
    # (mlflow/utils/request_utils.py augmented_raise_for_status).
    import requests

    with pytest.raises(requests.HTTPError) as ei:
        deploy.predict(endpoint="no-such-endpoint", inputs={"input": "x"})
    assert ei.value.response is not None and ei.value.response.status_code == 404
    assert "RESOURCE_DOES_NOT_EXIST" in str(ei.value)
