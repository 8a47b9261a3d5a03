"""Tokens-per-minute reservations on a local model use the model's own tokenizer: the
prompt is reserved at exactly the length the worker reports in ``usage.prompt_tokens``
(not the byte upper bound used for external models), and settled to the real usage."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import Server, wait_for

from fmserve.engines.bundled import smollm2_gguf
from fmserve.engines.prompt_tokens import PromptCounter

MODEL = "system.ai.smollm2-135m-instruct"
NAME = "rl-local-tokens"
# ~420 bytes of JSON: its byte bound alone is over the limit, its tokens are far under.
TEXT = "Please repeat after me: " + "the cat sat on the mat. " * 16
LIMIT = 300


@pytest.fixture(scope="module")
def local_ep(server: Server) -> Iterator[str]:
    with server.client() as c:
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": NAME,
            "config": {"served_entities": [{"name": "smol", "entity_name": MODEL,
                                            "entity_version": "1"}]},
            "ai_gateway": {"rate_limits": [{"tokens": LIMIT, "key": "endpoint",
                                            "renewal_period": "minute"}]}})
        assert r.status_code == 200, r.text
        wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{NAME}").json()["state"]
                 ["config_update"] == "NOT_UPDATING", timeout_s=180, what="deployment")
        try:
            yield NAME
        finally:
            c.delete(f"/api/2.0/serving-endpoints/{NAME}")


def _ask(c: httpx.Client) -> httpx.Response:
    return c.post(f"/serving-endpoints/{NAME}/invocations",
                  json={"messages": [{"role": "user", "content": TEXT}], "max_tokens": 8,
                        "temperature": 0})


def test_reservation_is_the_exact_prompt_plus_max_tokens(server: Server,
                                                        local_ep: str) -> None:
    """The gateway's count of a chat prompt is the worker's ``prompt_tokens``; requests
    whose byte bound alone exceeds the limit are admitted on that count; the window then
    holds what they really used, and the first one whose prompt + ``max_tokens`` does
    not fit beside it is refused."""
    counter = PromptCounter(str(smollm2_gguf()))
    prompt = counter.count([{"op": "generate", "params": {},
                             "messages": [{"role": "user", "content": TEXT,
                                           "tool_calls": None, "tool_call_id": None}]}])
    assert prompt is not None and prompt + 8 <= LIMIT < len(TEXT) + 64  # not the byte bound
    used, answers = 0, []
    with server.client() as c:
        while len(answers) < 20:
            r = _ask(c)
            answers.append(r.status_code)
            if r.status_code != 200:
                break
            assert r.json()["usage"]["prompt_tokens"] == prompt
            used += r.json()["usage"]["total_tokens"]
    assert answers[0] == 200, answers  # a byte-bound reservation (> LIMIT) would be 429
    assert answers[-1] == 429, r.text
    assert r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert int(r.headers["Retry-After"]) >= 1
    assert used <= LIMIT < used + prompt + 8  # settled to real use; refused only when full
