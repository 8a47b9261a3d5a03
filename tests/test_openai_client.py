"""The official ``openai`` client, unmodified, against a real ``fmserve serve`` (spec §7).

Both base URLs a user would configure are exercised: ``<host>/serving-endpoints``
(what ``WorkspaceClient.get_open_ai_client()`` builds) and ``<host>/v1``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest
from conftest import CHAT, EMBED, Server
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Name three colors of the rainbow."}]
MAX_TOKENS = 16


@pytest.fixture(scope="module", params=["/serving-endpoints", "/v1"])
def client(request: pytest.FixtureRequest, server: Server) -> Iterator[OpenAI]:
    c = OpenAI(base_url=server.url + request.param, api_key=server.token, timeout=120)
    try:
        yield c
    finally:
        c.close()


def _bad_client(server: Server, **kw) -> OpenAI:  # type: ignore[no-untyped-def]
    kw.setdefault("api_key", server.token)
    return OpenAI(base_url=server.url + "/serving-endpoints", max_retries=0, timeout=60, **kw)


# -- chat ----------------------------------------------------------------------


def test_chat_is_deterministic_at_temperature_zero(client: OpenAI) -> None:
    answers = [client.chat.completions.create(model=CHAT, messages=PROMPT,
                                              temperature=0, max_tokens=MAX_TOKENS)
               for _ in range(2)]
    first, second = answers
    text = first.choices[0].message.content
    assert text and text.strip()
    assert second.choices[0].message.content == text
    assert first.object == "chat.completion"
    assert first.model == CHAT
    assert first.id and first.id != second.id
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    for r in answers:
        u = r.usage
        assert u is not None
        assert u.prompt_tokens > 0
        assert 0 < u.completion_tokens <= MAX_TOKENS
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert first.usage == second.usage
    if first.choices[0].finish_reason == "length":
        assert first.usage is not None and first.usage.completion_tokens == MAX_TOKENS


def test_chat_stream_matches_non_streamed_answer(client: OpenAI) -> None:
    full = client.chat.completions.create(model=CHAT, messages=PROMPT,
                                          temperature=0, max_tokens=MAX_TOKENS)
    stream = client.chat.completions.create(model=CHAT, messages=PROMPT,
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == CHAT for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # Databricks puts cumulative usage on every chunk (spec §8.3).
    assert all(c.usage is not None for c in chunks)
    completions = [c.usage.completion_tokens for c in chunks if c.usage]
    assert completions == sorted(completions)
    assert last.usage is not None and full.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


# -- completions ---------------------------------------------------------------


def test_completions_string_prompt(client: OpenAI) -> None:
    r = client.completions.create(model=CHAT, prompt="The capital of France is",
                                  temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    assert len(r.choices) == 1
    assert r.choices[0].index == 0
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model=CHAT, prompt="The capital of France is",
                                      temperature=0, max_tokens=8)
    assert again.choices[0].text == r.choices[0].text


def test_completions_list_prompt_with_n(client: OpenAI) -> None:
    prompts = ["One, two, three,", "Monday, Tuesday,"]
    r = client.completions.create(model=CHAT, prompt=prompts, n=2, temperature=0, max_tokens=6)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert all(t.strip() for t in by_index.values())
    # At temperature 0 the n choices of one prompt agree; the two prompts differ.
    assert by_index[0] == by_index[1]
    assert by_index[2] == by_index[3]
    assert by_index[0] != by_index[2]
    # The same prompts one at a time give the same texts.
    solo = client.completions.create(model=CHAT, prompt=prompts[1], temperature=0, max_tokens=6)
    assert solo.choices[0].text == by_index[2]
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 4 * 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_stream(client: OpenAI) -> None:
    prompt = "Once upon a time"
    full = client.completions.create(model=CHAT, prompt=prompt, temperature=0, max_tokens=10)
    chunks = list(client.completions.create(model=CHAT, prompt=prompt, temperature=0,
                                            max_tokens=10, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


# -- embeddings ----------------------------------------------------------------


def test_embeddings_base64_default_and_float(client: OpenAI) -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "fmserve"]
    default = client.embeddings.create(model=EMBED, input=texts)  # base64 on the wire
    floats = client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    for r in (default, floats):
        assert r.model == EMBED
        assert [d.index for d in r.data] == [0, 1]
        assert r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens
        for d in r.data:
            assert len(d.embedding) == 384
            assert all(isinstance(x, float) for x in d.embedding)
            assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, abs_tol=1e-3)
    for a, b in zip(default.data, floats.data, strict=True):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    # Two different sentences give different vectors.
    assert default.data[0].embedding != default.data[1].embedding


def test_embeddings_single_string(client: OpenAI) -> None:
    r = client.embeddings.create(model=EMBED, input="hello world", encoding_format="float")
    assert len(r.data) == 1 and len(r.data[0].embedding) == 384


# -- models ----------------------------------------------------------------------


def test_models_list(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT, EMBED} <= ids


# -- errors ----------------------------------------------------------------------


def test_unknown_model_is_not_found(server: Server) -> None:
    c = _bad_client(server)
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="no-such-endpoint", messages=PROMPT,
                                  max_tokens=4)
    assert ei.value.status_code == 404
    assert isinstance(ei.value.body, dict)
    # The OpenAI envelope's error object: the client exposes code and type from it.
    assert ei.value.code == "RESOURCE_DOES_NOT_EXIST"
    assert ei.value.type == "not_found_error"
    assert "no-such-endpoint" in ei.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="no-such-endpoint", input="x")


def test_wrong_api_key_is_authentication_error(server: Server) -> None:
    c = _bad_client(server, api_key="dapi-not-a-real-token")
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model=CHAT, messages=PROMPT, max_tokens=4)
    assert ei.value.status_code == 401
    assert isinstance(ei.value.body, dict)
    assert ei.value.code == "UNAUTHENTICATED"
    assert ei.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        list(c.models.list())


def test_n_out_of_range_is_bad_request(server: Server) -> None:
    c = _bad_client(server)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model=CHAT, messages=PROMPT, max_tokens=4, n=9)
    assert ei.value.status_code == 400
    assert isinstance(ei.value.body, dict)
    assert ei.value.code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert ei.value.type == "invalid_request_error"
    assert "'n'" in ei.value.body["message"]
    assert "'n'" in str(ei.value)


def test_embeddings_model_rejects_chat(server: Server) -> None:
    c = _bad_client(server)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model=EMBED, messages=PROMPT, max_tokens=4)
    assert isinstance(ei.value.body, dict)
    assert EMBED in ei.value.body["message"]
