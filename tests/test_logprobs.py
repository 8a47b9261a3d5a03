"""logprobs / top_logprobs on the local SmolLM2 model: chat and completions, streamed
or not, OpenAI client shapes, both llama.cpp engines, bad values."""

from __future__ import annotations

import math
import queue
from typing import Any

import pytest
from conftest import CHAT, Server, openai_for
from openai import BadRequestError, OpenAI

from fmserve.engines.bundled import smollm2_gguf
from fmserve.engines.logprobs import completion_logprobs


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return openai_for(server)


def _check_entry(e: Any, top: int) -> None:
    """One chat logprob entry (openai ChatCompletionTokenLogprob)."""
    assert e.logprob <= 0.0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
    assert len(e.top_logprobs) == top
    lps = [t.logprob for t in e.top_logprobs]
    assert lps == sorted(lps, reverse=True) and all(lp <= 0.0 for lp in lps)
    assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-4
    if top:  # greedy: the sampled token is the most likely one
        assert e.token == e.top_logprobs[0].token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage is not None
    content = choice.logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens == 10
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        _check_entry(e, 3)
    # Without top_logprobs: the sampled tokens only; without logprobs: none at all.
    r0 = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=4, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r0.choices[0].logprobs.content] == [[]] * 4  # type: ignore[union-attr]
    assert [e.token for e in r0.choices[0].logprobs.content] == [  # type: ignore[union-attr]
        e.token for e in content[:4]]
    plain = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Name three fruits."}],
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    text, entries = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                entries.extend(c.logprobs.content)
    assert text and "".join(e.token for e in entries) == text
    assert 1 <= len(entries) <= 12
    for e in entries:
        _check_entry(e, 2)


def test_completions_logprobs_legacy_shape(client: OpenAI) -> None:
    r = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", max_tokens=8,
                                  temperature=0, logprobs=4)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 4 and max(top.values()) == pytest.approx(tlp, abs=1e-5)
        assert top[tok] == pytest.approx(tlp, abs=1e-5)
    assert lp.tokens[:2] == [" ", "5"]  # digits are single tokens; the model is sure of "5"
    assert lp.token_logprobs[1] > math.log(0.5)

    streamed = client.completions.create(model=CHAT, prompt="1, 2, 3, 4,", max_tokens=8,
                                         temperature=0, logprobs=1, stream=True)
    tokens, offsets, text = [], [], ""
    for chunk in streamed:
        c = chunk.choices[0]
        text += c.text
        if c.logprobs and c.logprobs.tokens:
            tokens += c.logprobs.tokens
            offsets += c.logprobs.text_offset or []
    assert tokens == lp.tokens and text == r.choices[0].text
    assert offsets == lp.text_offset


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "requires 'logprobs'"),
    ("chat", {"logprobs": "yes"}, "boolean"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"logprobs": True}, "integer"),
])
def test_bad_logprobs_values_are_400(client: OpenAI, path: str, body: dict[str, Any],
                                     needle: str) -> None:
    with pytest.raises(BadRequestError) as err:
        if path == "chat":
            client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2, extra_body=body)
        else:
            client.completions.create(model=CHAT, prompt="x", max_tokens=2, extra_body=body)
    assert err.value.status_code == 400 and needle in str(err.value)


def test_completion_logprobs_shape() -> None:
    entries = [{"token": "Hé", "logprob": -0.5, "bytes": list("Hé".encode()),
                "top_logprobs": [{"token": "Hé", "logprob": -0.5, "bytes": []}]},
               {"token": " there", "logprob": -1.0, "bytes": [], "top_logprobs": []}]
    assert completion_logprobs(entries, offset=3) == {
        "tokens": ["Hé", " there"], "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"Hé": -0.5}, {}], "text_offset": [3, 5]}


def _run_engine(engine: Any, msg: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs one request through an engine in this process; its ``tok`` events' entries."""
    events: list[dict[str, Any]] = []
    if hasattr(engine, "run"):
        from fmserve.engines.worker_main import CancelSet

        inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        inbox.put(msg)
        inbox.put(None)
        engine.run(inbox, CancelSet(), events.append)
    else:
        engine.handle(msg, events.append, lambda: False)
    assert events[-1]["t"] == "end", events[-1]
    return [e for ev in events if ev["t"] == "tok" for e in ev.get("lp", [])]


def test_serial_and_batched_engines_agree() -> None:
    """The one-at-a-time engine (FMSERVE_LLAMA_MAX_SEQS=1) and the batched engine report
    the same greedy tokens with nearly the same probabilities (the two evaluate the prompt
    in different batch shapes, which moves logits by up to ~0.1 on this Q4_1 model)."""
    from fmserve.engines.llama_batched import BatchedLlamaEngine
    from fmserve.engines.llama_engine import LlamaEngine

    spec = {"model_path": str(smollm2_gguf()), "n_ctx": 512, "n_threads": 2}
    msg = {"op": "generate", "id": "1", "prompt": "The capital of France is",
           "params": {"max_tokens": 6, "temperature": 0, "logprobs": 3}}
    serial = _run_engine(LlamaEngine(spec), dict(msg))
    batched = _run_engine(BatchedLlamaEngine({**spec, "max_seqs": 2}), dict(msg))
    assert len(serial) == len(batched) == 6
    assert [e["token"] for e in serial] == [e["token"] for e in batched]
    for a, b in zip(serial, batched, strict=True):
        assert math.exp(a["logprob"]) == pytest.approx(math.exp(b["logprob"]), abs=0.05)
        assert [t["token"] for t in a["top_logprobs"]][:1] == [
            t["token"] for t in b["top_logprobs"]][:1]
