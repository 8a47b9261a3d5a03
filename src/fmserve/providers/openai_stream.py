"""OpenAI-format answers and streams normalised for fmserve (used by ``openai_compat``).

Chat streams (https://platform.openai.com/docs/api-reference/chat-streaming) are passed
through chunk by chunk, guaranteeing what spec §8.3 asks of fmserve:

* ``role: "assistant"`` on the first delta of each choice;
* ``usage`` on every chunk, cumulative: the provider's last report, else
  ``{prompt_tokens: 0, completion_tokens: <deltas so far>}``; with
  ``stream_options.include_usage`` the chunk carrying ``finish_reason`` is held back
  until the final usage-only chunk, so it carries the full usage;
* tool-call deltas with a stable ``index`` per choice, ``id``/``type``/``function.name``
  on the first delta only, and no ``"{}"`` placeholder argument delta (a lone ``"{}"``
  is sent just before ``finish_reason`` when no other arguments followed);
* vLLM/DeepSeek ``reasoning_content`` deltas become reasoning content items;
* ``data: [DONE]`` ends the stream; a stream that ends without it is a 502, and an
  ``{"error": {...}}`` event is mapped like an HTTP error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from fmserve.errors import BadGateway, FmserveError
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.providers import common
from fmserve.providers.upstream import Body, provider_error, sse_events

_HEAD = ("id", "model", "created", "system_fingerprint", "service_tier", "obfuscation")
_NULL_EXTRAS = ("refusal", "function_call", "audio", "reasoning")


def strip_head(body: Body) -> Body:
    """``body`` without the provider's ``id``/``model``/``created`` (fmserve adds its own)."""
    for k in _HEAD:
        body.pop(k, None)
    return body


def openai_usage(u: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage with ``reasoning_tokens`` lifted from ``completion_tokens_details``."""
    if not u:
        return common.usage(0, 0)
    details = u.get("completion_tokens_details")
    if isinstance(details, dict) and details.get("reasoning_tokens") and \
            "reasoning_tokens" not in u:
        u["reasoning_tokens"] = details["reasoning_tokens"]
    if "total_tokens" not in u:
        u["total_tokens"] = u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
    return u


def message_text(msg: dict[str, Any]) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or []
                   if isinstance(b, dict) and b.get("type") == "text")


def normalise_message(msg: dict[str, Any]) -> None:
    """In place: ``reasoning_content`` → a reasoning block; null extras dropped."""
    for k in _NULL_EXTRAS:
        if k in msg and not msg[k]:
            del msg[k]
    rc = msg.pop("reasoning_content", None)
    if rc:
        text = msg.get("content")
        blocks: list[Any] = [common.reasoning_item(rc)]
        if isinstance(text, str) and text:
            blocks.append({"type": "text", "text": text})
        elif isinstance(text, list):
            blocks.extend(text)
        msg["content"] = blocks
    if msg.get("tool_calls") and msg.get("content") == "":
        msg["content"] = None


def stream_error(provider: str, data: Body) -> FmserveError:
    """The mapped error for an ``{"error": {...}}`` event inside a stream."""
    err = data.get("error")
    kind = str(err.get("type") or err.get("code") or "") if isinstance(err, dict) else ""
    status = 502
    for word, code in (("rate_limit", 429), ("invalid", 400), ("auth", 401),
                       ("permission", 403), ("overloaded", 503), ("timeout", 504)):
        if word in kind:
            status = code
            break
    return provider_error(provider, status, orjson.dumps(data))


class _Stream:
    """Per-stream state: role per choice, tool-call indexes, usage, text for validation."""

    def __init__(self, check_text: bool) -> None:
        self.roles: set[int] = set()
        self.calls: dict[tuple[int, Any], int] = {}
        self.pending_args: dict[tuple[int, Any], dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.deltas = 0
        self.reasoning_chars = 0
        self.prompt_estimate = 0  # used when the provider streams no usage
        self.texts: dict[int, str] | None = {} if check_text else None

    def current_usage(self) -> dict[str, Any]:
        u = self.usage if self.usage is not None else common.usage(self.prompt_estimate,
                                                                   self.deltas)
        if self.reasoning_chars and not u.get("reasoning_tokens"):
            # The provider streamed reasoning but did not count it: estimate it.
            u = {**u, "reasoning_tokens": common.estimate_reasoning_tokens(
                self.reasoning_chars)}
        return u

    def tool_deltas(self, ci: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        per_choice = [k for k in self.calls if k[0] == ci]
        for tc in calls:
            key = (ci, tc.get("index", tc.get("id")))
            fn = tc.get("function") or {}
            args = fn.get("arguments") or ""
            if key not in self.calls:
                self.calls[key] = len(per_choice)
                per_choice.append(key)
                placeholder = args == "{}"  # sent only if no real arguments follow
                if placeholder:
                    self.pending_args[key] = {"index": self.calls[key],
                                              "function": {"arguments": "{}"}}
                out.append({"index": self.calls[key],
                            "id": tc.get("id") or common.new_call_id(), "type": "function",
                            "function": {"name": fn.get("name") or "",
                                         "arguments": "" if placeholder else args}})
                continue
            self.pending_args.pop(key, None)
            if args:
                out.append({"index": self.calls[key], "function": {"arguments": args}})
        return out

    def flush_args(self, ci: int) -> list[dict[str, Any]]:
        keys = [k for k in self.pending_args if k[0] == ci]
        return [self.pending_args.pop(k) for k in keys]


def reasoning_chars(content: list[Any]) -> int:
    """Characters of reasoning summary text in a list ``content``."""
    return sum(len(s.get("text") or "") for b in content
               if isinstance(b, dict) and b.get("type") == "reasoning"
               for s in b.get("summary") or [] if isinstance(s, dict))


async def _events(resp: aiohttp.ClientResponse, provider: str) -> AsyncIterator[Body | None]:
    """Decoded ``data:`` events; None for ``[DONE]``."""
    async for _, data in sse_events(resp):
        if data == "[DONE]":
            yield None
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BadGateway(f"{provider} sent a stream event that is not JSON: "
                             f"{data[:200]!r}") from None
        if not isinstance(event, dict):
            raise BadGateway(f"{provider} sent a stream event that is not an object.")
        if "error" in event and not event.get("choices"):
            raise stream_error(provider, event)
        yield event
    raise BadGateway(f"The stream from {provider} ended without 'data: [DONE]'.")


def _delta(st: _Stream, c: dict[str, Any]) -> bool:
    """Normalises one choice of a chunk in place; True when it carries ``finish_reason``."""
    ci = c.get("index", 0)
    delta = c.get("delta") or {}
    c["delta"] = delta
    if ci not in st.roles:
        st.roles.add(ci)
        delta.setdefault("role", "assistant")
    rc = delta.pop("reasoning_content", None)
    if rc:
        delta["content"] = [common.reasoning_item(rc)]
    content = delta.get("content")
    if isinstance(content, list):
        st.reasoning_chars += reasoning_chars(content)
    if content:
        st.deltas += 1
        if st.texts is not None and isinstance(content, str):
            st.texts[ci] = st.texts.get(ci, "") + content
    for k in _NULL_EXTRAS:
        if k in delta and not delta[k]:
            del delta[k]
    if delta.get("tool_calls"):
        st.deltas += 1
        delta["tool_calls"] = st.tool_deltas(ci, delta["tool_calls"])
    if not c.get("finish_reason"):
        return False
    if st.pending_args:
        delta.setdefault("tool_calls", []).extend(st.flush_args(ci))
    if st.texts is not None and c["finish_reason"] == "tool_calls":
        st.texts.pop(ci, None)
    return True


async def chat_chunks(resp: aiohttp.ClientResponse, req: ChatCompletionRequest, provider: str,
                      usage_last: bool, image_tokens: int = 0) -> AsyncIterator[Body]:
    """fmserve chat chunks from an OpenAI chat stream (see the module docstring).

    ``usage_last``: the provider sends usage in a final usage-only chunk;
    ``image_tokens``: the estimated prompt tokens of the request's images, counted when
    the provider streams no usage.

    Raises:
        FmserveError: an error event, a malformed event, no ``[DONE]``, or (at the end)
            an answer that breaks ``response_format``.
    """
    st = _Stream(bool(req.response_format and req.response_format.get("type") != "text"))
    st.prompt_estimate = req.estimated_prompt_tokens() + image_tokens
    held: list[Body] = []  # finish chunks waiting for the final usage chunk
    async for chunk in _events(resp, provider):
        if chunk is None:
            for h in held:
                h["usage"] = st.current_usage()
                yield h
            for text in (st.texts or {}).values():
                common.check_structured(text, req)
            return
        if chunk.get("usage"):
            st.usage = openai_usage(chunk["usage"])
        choices = chunk.get("choices") or []
        if not choices:
            for h in held:
                h["usage"] = st.current_usage()
                yield h
            if not held and st.usage is not None:
                yield {"object": "chat.completion.chunk", "choices": [], "usage": st.usage}
            held = []
            continue
        finished = False
        for c in choices:
            finished = _delta(st, c) or finished
        strip_head(chunk)
        chunk["object"] = "chat.completion.chunk"
        chunk["usage"] = st.current_usage()
        if finished and usage_last and st.usage is None:
            held.append(chunk)
        else:
            yield chunk


async def completion_chunks(resp: aiohttp.ClientResponse, provider: str) -> AsyncIterator[Body]:
    """fmserve completion chunks from an OpenAI ``/completions`` stream."""
    st = _Stream(False)
    async for chunk in _events(resp, provider):
        if chunk is None:
            return
        if chunk.get("usage"):
            st.usage = openai_usage(chunk["usage"])
        if not chunk.get("choices") and st.usage is None:
            continue
        st.deltas += len(chunk.get("choices") or [])
        strip_head(chunk)
        chunk["object"] = "text_completion"
        chunk["usage"] = st.current_usage()
        yield chunk
