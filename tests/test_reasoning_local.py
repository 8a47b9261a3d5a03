"""Reasoning on local models: <think> parsing, the thinking budget, usage.reasoning_tokens.

No reasoning GGUF ships in a package, so the worker here is the scripted engine
(``engines/scripted.py``): a real worker process replaying a real token stream through
the same LlamaBackend code a reasoning GGUF goes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CHAT

from fmserve.engines.local import LlamaBackend
from fmserve.engines.pool import WorkerPool
from fmserve.engines.reasoning import ThinkSplitter
from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest

SCRIPT = ["<th", "ink>", "Let", " me", " think", " about", " it", ".", " More", " thoughts",
          "</th", "ink>", "\n\n", "The", " answer", " is", " 42", "."]
ANSWER = ["The", " answer", " is", " 42", "."]


def test_splitter_handles_tags_split_across_tokens() -> None:
    s = ThinkSplitter()
    out = [p for tok in SCRIPT for p in s.feed(tok)] + s.flush()
    reasoning = "".join(t for k, t in out if k == "reasoning")
    text = "".join(t for k, t in out if k == "text")
    assert reasoning == "Let me think about it. More thoughts"
    assert text == "The answer is 42."


def test_splitter_without_thinking_and_with_opened_prompt() -> None:
    s = ThinkSplitter()
    assert [p for t in ["<", "b>hi", "</b>"] for p in s.feed(t)] + s.flush() == [
        ("text", "<b>hi"), ("text", "</b>")]
    s = ThinkSplitter(inside=True)
    out = [p for t in ["plan", "</think>", "done"] for p in s.feed(t)]
    assert out == [("reasoning", "plan"), ("text", "done")]


def _run(script: list[str], tmp: Path,
         body: Callable[[LlamaBackend], Awaitable[Any]], opens_think: bool = False) -> Any:
    async def main() -> Any:
        spec = {"engine": "scripted", "script": script, "answer": ANSWER,
                "opens_think": opens_think}
        pool = WorkerPool("scripted", spec, tmp / "w.log")
        await pool.start()
        try:
            assert pool.state == "ready", pool.state_message
            return await body(LlamaBackend("scripted", pool))
        finally:
            await pool.stop()
    return asyncio.run(main())


def _req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "What is the answer?"}], **kw})


def test_reasoning_blocks_and_usage(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        assert b.capabilities.reasoning
        return await b.chat(_req())
    a = _run(SCRIPT, tmp_path, body)
    msg = a["choices"][0]["message"]
    assert msg["content"] == [
        {"type": "reasoning", "summary": [{"type": "summary_text",
                                           "text": "Let me think about it. More thoughts"}]},
        {"type": "text", "text": "The answer is 42."}]
    assert a["usage"]["completion_tokens"] == len(SCRIPT)
    assert a["usage"]["reasoning_tokens"] == 12  # up to and including "</th" "ink>"


def test_budget_ends_thinking_and_model_answers(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        return await b.chat(_req(max_tokens=100,
                                 thinking={"type": "enabled", "budget_tokens": 4}))
    a = _run(SCRIPT, tmp_path, body)
    content = a["choices"][0]["message"]["content"]
    assert content[0]["summary"][0]["text"] == "Let me"
    assert content[1] == {"type": "text", "text": "The answer is 42."}
    assert a["usage"]["reasoning_tokens"] == 4
    assert a["usage"]["completion_tokens"] == 4 + len(ANSWER)


def test_stream_reasoning_then_text(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        return [c async for c in b.chat_stream(_req(stream=True))]
    chunks = _run(SCRIPT, tmp_path, body)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    reasoning = "".join(d["content"][0]["summary"][0]["text"] for d in deltas
                        if isinstance(d.get("content"), list))
    text = "".join(d["content"] for d in deltas if isinstance(d.get("content"), str))
    assert reasoning == "Let me think about it. More thoughts"
    assert text == "The answer is 42."
    first_text = next(i for i, d in enumerate(deltas) if d.get("content") and
                      isinstance(d["content"], str))
    assert all(not isinstance(d.get("content"), list) for d in deltas[first_text:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["reasoning_tokens"] == 12
    assert chunks[-1]["usage"]["completion_tokens"] == len(SCRIPT)


def test_template_that_opens_thinking(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        return await b.chat(_req())
    a = _run(SCRIPT[2:], tmp_path, body, opens_think=True)
    content = a["choices"][0]["message"]["content"]
    assert content[0]["summary"][0]["text"] == "Let me think about it. More thoughts"
    assert content[1]["text"] == "The answer is 42."


def test_thinking_disabled_answers_at_once(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        return await b.chat(_req(thinking={"type": "disabled"}))
    a = _run(SCRIPT, tmp_path, body)
    assert a["choices"][0]["message"]["content"] == "The answer is 42."
    assert "reasoning_tokens" not in a["usage"]


def test_budget_must_be_below_max_tokens(tmp_path: Path) -> None:
    async def body(b: LlamaBackend) -> Any:
        with pytest.raises(InvalidParameterValue, match="less than max_tokens"):
            await b.chat(_req(max_tokens=10, thinking={"type": "enabled",
                                                       "budget_tokens": 10}))
        return True
    assert _run(SCRIPT, tmp_path, body)


def test_model_that_cannot_reason_is_a_400(http: httpx.Client) -> None:
    r = http.post("/serving-endpoints/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "thinking": {"type": "enabled", "budget_tokens": 20}})
    assert r.status_code == 400, r.text
    assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "Reasoning" in r.json()["message"]
    r = http.post("/serving-endpoints/chat/completions", json={
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}],
        "reasoning_effort": "high"})
    assert r.status_code == 400, r.text
