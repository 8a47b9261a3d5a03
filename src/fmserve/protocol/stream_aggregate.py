"""A streamed answer folded back into the one body a non-streamed call would have returned.

:class:`StreamAggregator` takes the chunks of a stream (spec §8.3), in order, and
:meth:`~StreamAggregator.body` returns

* for ``chat.completion.chunk`` chunks: a ``chat.completion`` — per choice (by
  ``index``) the ``message`` (``role``; ``content`` as one string, or, when reasoning
  items were streamed, a list of reasoning items with their summary text joined and
  ``{"type": "text", "text"}`` items; ``tool_calls`` by ``index`` with ``id``, ``type``,
  ``function.name`` and the ``function.arguments`` fragments joined), ``finish_reason``
  and ``logprobs.content`` joined;
* for ``text_completion`` chunks: a ``text_completion`` with each choice's ``text`` joined;

plus the stream's ``id``, ``created``, ``model`` and last ``usage`` (stream usage is
cumulative). Pure, no I/O: inference tables store streams this way (governance §1.5:
"the response payload aggregates the response of returned chunks").
"""

from __future__ import annotations

from typing import Any

Body = dict[str, Any]


class _Choice:
    __slots__ = ("role", "parts", "listed", "calls", "finish", "logprobs", "text")

    def __init__(self) -> None:
        self.role: str | None = None
        self.parts: list[Any] = []  # str runs and content items, in order
        self.listed = False  # a list content item was streamed
        self.calls: dict[int, Body] = {}
        self.finish: str | None = None
        self.logprobs: list[Any] | None = None
        self.text: list[str] = []  # text_completion choices

    def add_content(self, content: Any) -> None:
        if isinstance(content, str):
            if content:
                if self.parts and isinstance(self.parts[-1], str):
                    self.parts[-1] += content
                else:
                    self.parts.append(content)
            return
        if not isinstance(content, list):
            return
        self.listed = True
        for item in content:
            last = self.parts[-1] if self.parts else None
            if (isinstance(item, dict) and item.get("type") == "reasoning"
                    and isinstance(last, dict) and last.get("type") == "reasoning"
                    and _summary_text(last) is not None and _summary_text(item) is not None):
                prev, new = last["summary"][0], item["summary"][0]
                prev["text"] = prev.get("text", "") + new.get("text", "")
                if new.get("signature"):
                    prev["signature"] = new["signature"]
            elif isinstance(item, dict) and item.get("type") == "text":
                self.add_content(item.get("text") or "")
            elif isinstance(item, dict):
                self.parts.append(_copy(item))

    def add_calls(self, calls: list[Body]) -> None:
        for call in calls:
            i = call.get("index", len(self.calls))
            have = self.calls.setdefault(i, {"id": None, "type": "function",
                                             "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                have["id"] = call["id"]
            if call.get("type"):
                have["type"] = call["type"]
            fn = call.get("function") or {}
            if fn.get("name"):
                have["function"]["name"] = fn["name"]
            if isinstance(fn.get("arguments"), str):
                have["function"]["arguments"] += fn["arguments"]

    def content(self) -> Any:
        if not self.listed:
            return "".join(p for p in self.parts if isinstance(p, str)) if self.parts else (
                None if self.calls else "")
        return [{"type": "text", "text": p} if isinstance(p, str) else p for p in self.parts]


def _summary_text(item: Body) -> str | None:
    summary = item.get("summary")
    if isinstance(summary, list) and len(summary) == 1 and isinstance(summary[0], dict) \
            and summary[0].get("type") == "summary_text":
        return str(summary[0].get("text", ""))
    return None


def _copy(item: Body) -> Body:
    out = dict(item)
    if isinstance(item.get("summary"), list):
        out["summary"] = [dict(s) if isinstance(s, dict) else s for s in item["summary"]]
    return out


class StreamAggregator:
    """Feed every chunk to :meth:`add`; :meth:`body` is the aggregated answer."""

    def __init__(self) -> None:
        self.head: Body = {}
        self.object = "chat.completion.chunk"
        self.usage: Any = None
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: Body) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            self.object = chunk.get("object") or self.object
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            ch = self.choices.setdefault(c.get("index", 0), _Choice())
            if c.get("finish_reason"):
                ch.finish = c["finish_reason"]
            lp = c.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                ch.logprobs = (ch.logprobs or []) + lp["content"]
            if "text" in c:
                ch.text.append(c.get("text") or "")
                continue
            delta = c.get("delta") or {}
            if delta.get("role"):
                ch.role = delta["role"]
            ch.add_content(delta.get("content"))
            if delta.get("tool_calls"):
                ch.add_calls(delta["tool_calls"])

    def body(self) -> Body:
        choices: list[Body] = []
        completion = self.object == "text_completion"
        for i in sorted(self.choices):
            ch = self.choices[i]
            if completion:
                choices.append({"index": i, "text": "".join(ch.text),
                                "finish_reason": ch.finish, "logprobs": None})
                continue
            msg: Body = {"role": ch.role or "assistant", "content": ch.content()}
            if ch.calls:
                msg["tool_calls"] = [ch.calls[k] for k in sorted(ch.calls)]
            choice: Body = {"index": i, "message": msg, "finish_reason": ch.finish}
            if ch.logprobs is not None:
                choice["logprobs"] = {"content": ch.logprobs, "refusal": None}
            choices.append(choice)
        out: Body = {**self.head, "object": "text_completion" if completion
                     else "chat.completion", "choices": choices}
        if self.usage is not None:
            out["usage"] = self.usage
        return out
