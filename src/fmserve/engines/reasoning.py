"""Reasoning on local models: ``<think>…</think>`` output split into reasoning and answer.

GGUF chat templates of reasoning models (Qwen3, DeepSeek-R1, …) make the model emit
its thinking between ``<think>`` and ``</think>`` before the answer; some templates
already open the section in the generation prompt. :class:`ThinkSplitter` turns the
token text stream into ``("reasoning", text)`` and ``("text", text)`` pieces, also when
a tag is split across tokens.

:func:`reasoned_run` runs one generation and enforces ``thinking.budget_tokens``: when
the thinking section reaches the budget (tokens) without closing, the generation is
cancelled and resumed with the thinking so far plus ``</think>`` appended to the prompt
(the worker's ``think_prefix`` parameter), so the model goes on to answer. Reasoning
tokens are counted into ``reasoning_tokens`` (and included in ``completion_tokens``).
The same code runs for a real reasoning GGUF and for the scripted test engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fmserve.protocol.responses import chat_chunk, reasoning_item, usage

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkSplitter:
    """Feeds generated text; returns ``(kind, text)`` pieces, kind ``reasoning`` or ``text``.

    ``inside``: the prompt already opened the thinking section.
    """

    def __init__(self, inside: bool = False) -> None:
        self.state = "inside" if inside else "start"
        self._buf = ""

    @property
    def thinking(self) -> bool:
        return self.state == "inside"

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self._buf += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self._buf.lstrip()
                if head.startswith(OPEN_TAG):
                    self._buf, self.state = head[len(OPEN_TAG):].lstrip("\n"), "inside"
                    continue
                if not head or OPEN_TAG.startswith(head):
                    return out  # maybe the start of the tag: wait
                self.state = "answer"
                continue
            if self.state == "inside":
                pos = self._buf.find(CLOSE_TAG)
                if pos >= 0:
                    if pos:
                        out.append(("reasoning", self._buf[:pos]))
                    self._buf, self.state = self._buf[pos + len(CLOSE_TAG):], "after"
                    continue
                keep = _held_suffix(self._buf, CLOSE_TAG)
                emit = self._buf[:len(self._buf) - keep]
                if emit:
                    out.append(("reasoning", emit))
                self._buf = self._buf[len(emit):]
                return out
            if self.state == "after":  # drop the blank lines between </think> and the answer
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return out
                self.state = "answer"
            if self._buf:
                out.append(("text", self._buf))
            self._buf = ""
            return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf, ""
        if not rest or self.state == "after":
            return []
        return [("reasoning" if self.state == "inside" else "text", rest)]


@dataclass
class ReasonedEvent:
    """``kind``: start (prompt_tokens), reasoning / text (text), end (finish, counts)."""

    kind: str
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str | None = None


Submit = Callable[[dict[str, Any]], Awaitable[Any]]


async def reasoned_run(submit: Submit, op: dict[str, Any],
                       budget: int | None) -> AsyncIterator[ReasonedEvent]:
    """Run ``op`` on a worker, splitting thinking from the answer; see the module docstring.

    ``submit(op)`` returns a worker request with ``async next()`` and ``close()``.
    """
    req = await submit(op)
    splitter: ThinkSplitter | None = None
    thought: list[str] = []
    reasoning_tokens = 0
    used = 0  # completion tokens of the cancelled first generation
    resumed = False
    try:
        while True:
            ev = await req.next()
            t = ev["t"]
            if t == "start":
                if splitter is None:
                    splitter = ThinkSplitter(inside=bool(ev.get("thinking")))
                    yield ReasonedEvent("start", prompt_tokens=ev["prompt_tokens"])
                continue
            assert splitter is not None
            if t == "tok":
                was_thinking = splitter.thinking
                for kind, text in splitter.feed(ev["text"]):
                    if kind == "reasoning":
                        thought.append(text)
                    yield ReasonedEvent(kind, text)
                n = used + int(ev["n"])
                if was_thinking or splitter.thinking:
                    reasoning_tokens = n
                if budget is not None and splitter.thinking and not resumed and \
                        reasoning_tokens >= budget:
                    # Budget spent: end the thinking section and let the model answer.
                    req.close()
                    used, resumed = n, True
                    params = dict(op.get("params") or {})
                    if params.get("max_tokens"):
                        params["max_tokens"] = max(1, int(params["max_tokens"]) - n)
                    req = await submit({**op, "params": {**params,
                                                         "think_prefix": "".join(thought)}})
                    splitter = ThinkSplitter(inside=False)
                    splitter.state = "after"
            elif t == "end":
                for kind, text in splitter.flush():
                    yield ReasonedEvent(kind, text)
                yield ReasonedEvent("end", completion_tokens=used + ev["completion_tokens"],
                                    reasoning_tokens=reasoning_tokens,
                                    finish_reason=ev["finish_reason"])
                return
    finally:
        req.close()


def think_prompt(prompt: str, params: dict[str, Any]) -> tuple[str, bool]:
    """The rendered chat prompt adjusted for thinking; True when it ends inside ``<think>``.

    ``params["no_think"]``: an empty thinking section is prefilled (the model answers
    at once). ``params["think_prefix"]``: the thinking so far is prefilled and closed
    (resuming after the budget).
    """
    opened = prompt.rstrip().endswith(OPEN_TAG)
    if params.get("think_prefix") is not None:
        head = "" if opened else OPEN_TAG + "\n"
        return f"{prompt}{head}{params['think_prefix'].rstrip()}\n{CLOSE_TAG}\n\n", False
    if params.get("no_think"):
        head = "" if opened else OPEN_TAG
        return f"{prompt}{head}\n\n{CLOSE_TAG}\n\n", False
    return prompt, opened


async def reasoned_chat(submit: Submit, ops: list[dict[str, Any]],
                        budget: int | None) -> dict[str, Any]:
    """A chat completion body for reasoning models: content = reasoning + text blocks."""
    choices, prompt, completion, reasoning = [], 0, 0, 0
    for i, op in enumerate(ops):
        thought, answer = [], []
        async for ev in reasoned_run(submit, op, budget):
            if ev.kind == "start":
                prompt = prompt or ev.prompt_tokens
            elif ev.kind == "reasoning":
                thought.append(ev.text)
            elif ev.kind == "text":
                answer.append(ev.text)
            else:
                completion += ev.completion_tokens
                reasoning += ev.reasoning_tokens
                finish = ev.finish_reason
        content: Any = "".join(answer)
        if thought:
            content = [reasoning_item("".join(thought)), {"type": "text", "text": content}]
        choices.append({"index": i, "message": {"role": "assistant", "content": content},
                        "finish_reason": finish})
    return {"object": "chat.completion", "choices": choices,
            "usage": usage(prompt, completion, reasoning)}


async def reasoned_stream(submit: Submit, ops: list[dict[str, Any]],
                          budget: int | None) -> AsyncIterator[dict[str, Any]]:
    """Chunks: reasoning deltas as ``[{"type": "reasoning", …}]`` content, then text."""
    prompt, done_completion, done_reasoning = 0, 0, 0
    for i, op in enumerate(ops):
        n = 0
        async for ev in reasoned_run(submit, op, budget):
            delta: dict[str, Any] = {}
            finish = None
            if ev.kind == "start":
                prompt = prompt or ev.prompt_tokens
                delta = {"role": "assistant", "content": ""}
            elif ev.kind in ("reasoning", "text"):
                n += 1
                delta = {"content": [reasoning_item(ev.text)] if ev.kind == "reasoning"
                         else ev.text}
            else:
                done_completion += ev.completion_tokens
                done_reasoning += ev.reasoning_tokens
                n, finish = 0, ev.finish_reason
            # Cumulative usage; within a choice the tokens are estimated by pieces
            # until its end event gives the exact count.
            yield chat_chunk(i, delta, finish, usage(prompt, done_completion + n, done_reasoning))
