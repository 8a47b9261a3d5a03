"""Prompt prefix caching in the batched llama.cpp engine: multi-turn chats and repeated
prompts evaluate only what is new; the reused cells give the same answers."""

from __future__ import annotations

import math
import queue
from typing import Any

import pytest
from conftest import CHAT, Server


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post(f"/serving-endpoints/{path}", json={"model": CHAT, **body})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def _cached(answer: dict[str, Any]) -> int:
    return int((answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def test_multi_turn_chat_reuses_the_history(server: Server) -> None:
    history = [{"role": "system", "content": "You are a terse assistant. " * 8},
               {"role": "user", "content": "Name a large animal."}]
    first = _post(server, "chat/completions",
                  {"messages": history, "max_tokens": 12, "temperature": 0.7})
    history += [first["choices"][0]["message"],
                {"role": "user", "content": "And a small one?"}]
    second = _post(server, "chat/completions",
                   {"messages": history, "max_tokens": 12, "temperature": 0.7})
    # The whole first prompt (system + first turn) came from the cache.
    assert _cached(second) >= first["usage"]["prompt_tokens"], second["usage"]
    assert _cached(second) < second["usage"]["prompt_tokens"]
    assert second["choices"][0]["message"]["content"]


def test_cached_prefix_gives_the_same_distribution(server: Server) -> None:
    """The next-token distribution after a cached prefix matches a full evaluation."""
    prompt = {"prompt": "Saturday, Sunday, Monday,", "max_tokens": 1, "logprobs": 5}
    full = _post(server, "completions", {**prompt, "temperature": 0})  # whole prompt
    hits = [_post(server, "completions", {**prompt, "temperature": 0.05}) for _ in range(2)]
    assert _cached(hits[1]) == full["usage"]["prompt_tokens"] - 1
    ref = full["choices"][0]["logprobs"]["top_logprobs"][0]
    got = hits[1]["choices"][0]["logprobs"]["top_logprobs"][0]
    assert next(iter(ref)) == next(iter(got)) and " Tuesday" in ref
    for token, lp in ref.items():
        assert math.exp(lp) == pytest.approx(math.exp(got.get(token, -99.0)), abs=0.05)


def test_greedy_and_seeded_requests_evaluate_the_whole_prompt(server: Server) -> None:
    body = {"prompt": "January, February, March,", "max_tokens": 4}
    for extra in ({"temperature": 0}, {"temperature": 0.8, "seed": 11}):
        answers = [_post(server, "completions", {**body, **extra}) for _ in range(2)]
        assert [_cached(a) for a in answers] == [0, 0]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]


def test_concurrent_requests_share_one_prefill() -> None:
    """Requests arriving together with one system prompt (or n > 1 choices of one
    prompt): the first evaluates the shared prefix, the others copy its cells."""
    from fmserve.engines.bundled import smollm2_gguf
    from fmserve.engines.llama_batched import BatchedLlamaEngine
    from fmserve.engines.worker_main import CancelSet

    engine = BatchedLlamaEngine({"model_path": str(smollm2_gguf()), "n_ctx": 2048,
                                 "n_threads": 2, "max_seqs": 4})
    system = {"role": "system", "content": "You are a careful, terse assistant. " * 8}
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    questions = ["Name a river.", "Name a mountain.", "Name a desert."]
    for i, q in enumerate(questions + [questions[0]]):  # the last: a 2nd choice of the 1st
        inbox.put({"op": "generate", "id": str(i), "params": {"max_tokens": 4, "temperature": 0.7},
                   "messages": [system, {"role": "user", "content": q}]})
    inbox.put(None)
    events: list[dict[str, Any]] = []
    engine.run(inbox, CancelSet(), events.append)
    starts = {e["id"]: e for e in events if e["t"] == "start"}
    ends = {e["id"]: e for e in events if e["t"] == "end"}
    assert sorted(ends) == ["0", "1", "2", "3"]
    assert starts["0"]["cached_tokens"] == 0
    for rid in ("1", "2"):  # the system prompt (~70 tokens) came from request 0's cells
        assert 60 <= starts[rid]["cached_tokens"] < starts[rid]["prompt_tokens"] - 3
    assert starts["3"]["cached_tokens"] == starts["3"]["prompt_tokens"] - 1
