"""Cohere (provider ``cohere``): the v2 Chat and Embed APIs.

Config (spec §2.4 ``cohere_config``):

* ``cohere_api_key`` (a ``{{secrets/scope/key}}`` reference) or ``cohere_api_key_plaintext``
  (required), sent as ``Authorization: Bearer <key>``;
* ``cohere_api_base``: the API base URL, default ``https://api.cohere.com`` (proxies,
  private deployments, tests); ``/v2/chat`` and ``/v2/embed`` are appended.

Wire formats (https://docs.cohere.com/v2/reference/chat, /v2/reference/chat-stream,
/v2/reference/embed, /v2/docs/streaming):

* chat: ``POST {base}/v2/chat`` ``{"model", "messages", "tools"?, "tool_choice"?,
  "response_format"?, "max_tokens"?, "temperature"?, "p"?, "k"?, "seed"?,
  "frequency_penalty"?, "presence_penalty"?, "stop_sequences"?, "stream"?}``. Messages are
  ``{"role": "system"|"user", "content": str}``, ``{"role": "assistant", "content"?: str,
  "tool_plan"?: str, "tool_calls"?: [{"id", "type": "function", "function": {"name",
  "arguments": <JSON text>}}]}`` and ``{"role": "tool", "tool_call_id", "content": str}``;
  tools are OpenAI-style ``{"type": "function", "function": {"name", "description",
  "parameters"}}``. The answer is ``{"id", "finish_reason", "message": {"role",
  "content": [{"type": "text", "text"}], "tool_plan"?, "tool_calls"?}, "usage":
  {"billed_units": {"input_tokens", "output_tokens"}, "tokens": {...}}}``.
* chat stream (``"stream": true``): ``text/event-stream`` with ``event: <type>`` and
  ``data: {"type": <type>, ...}``: ``message-start``, ``content-start``, ``content-delta``
  (``delta.message.content.text``), ``content-end``, ``tool-plan-delta``,
  ``tool-call-start`` (``index``, ``delta.message.tool_calls {id, type, function {name,
  arguments}}``), ``tool-call-delta`` (``delta.message.tool_calls.function.arguments``
  fragment), ``tool-call-end``, ``citation-start``/``citation-end``, ``message-end``
  (``delta.finish_reason``, ``delta.usage``). A stream without ``message-end`` is a 502.
* embeddings: ``POST {base}/v2/embed`` ``{"model", "texts", "input_type":
  "search_document", "embedding_types": ["float"], "output_dimension"?}`` →
  ``{"embeddings": {"float": [[...]]}, "meta": {"billed_units": {"input_tokens"}}}``;
  at most 96 texts a call (larger inputs are split). ``extra_params`` (e.g.
  ``{"input_type": "search_query"}``) override body fields.

Mapping choices:

* ``tool_choice``: ``auto`` → omitted, ``none`` → ``"NONE"``, ``required`` →
  ``"REQUIRED"``. Cohere has no named tool choice: a named function sends **only that
  tool** with ``"REQUIRED"``. ``parallel_tool_calls: false`` is a 400 (Cohere cannot
  limit calls to one).
* ``response_format`` ``json_object`` / ``json_schema`` → ``{"type": "json_object",
  "json_schema"?: schema}``; the final text is validated (``check_structured``).
* ``top_p`` → ``p``, ``top_k`` → ``k``, ``stop`` → ``stop_sequences``; ``seed``,
  ``frequency_penalty``, ``presence_penalty`` as is; anything else is a 400.
* Not supported (declared in :attr:`CohereBackend.chat_features`, so a 400 before any
  call): image input and reasoning (``thinking`` / ``reasoning_effort``); reasoning
  blocks in assistant history are a 400 too.
* ``n`` > 1: concurrent single calls (not when streaming).
* Finish reasons: ``COMPLETE``/``STOP_SEQUENCE`` → ``stop``, ``MAX_TOKENS`` → ``length``,
  ``TOOL_CALL`` → ``tool_calls``, ``ERROR_TOXIC`` → ``content_filter``, ``ERROR*`` /
  ``TIMEOUT`` → ``error``. ``tool_plan`` text is not returned (``content`` is null with
  tool calls, as in OpenAI).
* Usage: ``usage.tokens`` (what the model processed), else ``usage.billed_units``.

Errors: Cohere's ``{"message"}`` (or ``{"id", "message"}``) body is kept; statuses map as
in :func:`~fmserve.providers.upstream.provider_error` (429 keeps ``Retry-After``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson

from fmserve.backends import Capabilities, EmbeddingResult
from fmserve.errors import BadGateway, InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, ChatMessage
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import common as c
from fmserve.providers.base import ExternalBackend, ProviderContext
from fmserve.providers.upstream import sse_events

Body = dict[str, Any]

DEFAULT_BASE = "https://api.cohere.com"
EMBED_BATCH = 96  # Cohere Embed: at most 96 texts per call
FINISH_REASONS = {"COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length",
                  "TOOL_CALL": "tool_calls", "ERROR_TOXIC": "content_filter"}


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> CohereBackend:
    return CohereBackend(name, model, ctx)


def finish_reason(value: str | None) -> str:
    """The OpenAI finish reason for a Cohere ``finish_reason``."""
    v = (value or "COMPLETE").upper()
    if v in FINISH_REASONS:
        return FINISH_REASONS[v]
    return "error" if v.startswith("ERROR") or v == "TIMEOUT" else "stop"


def usage_of(u: Body | None) -> tuple[int, int]:
    """``(input_tokens, output_tokens)`` from a Cohere ``usage`` object."""
    u = u or {}
    t = u.get("tokens") or u.get("billed_units") or {}
    return int(t.get("input_tokens") or 0), int(t.get("output_tokens") or 0)


# -- request translation -------------------------------------------------------------------
def _message(i: int, m: ChatMessage) -> Body | None:
    for p in c.parts(m):
        if p.get("type") not in ("text", "reasoning"):
            raise InvalidParameterValue(f"messages[{i}]: content type '{p.get('type')}' is not "
                                        f"supported by provider cohere (text only).")
    if m.role in ("system", "developer"):
        return {"role": "system", "content": m.text()}
    if m.role == "user":
        return {"role": "user", "content": m.text()}
    if m.role == "tool":
        if not m.tool_call_id:
            raise InvalidParameterValue(f"messages[{i}]: a tool message needs tool_call_id")
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.text()}
    if c.reasoning_of(m):
        raise InvalidParameterValue(f"messages[{i}]: reasoning content is not supported by "
                                    f"provider cohere.")
    out: Body = {"role": "assistant"}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": call.get("id") or c.new_call_id(), "type": "function",
             "function": {"name": (call.get("function") or {}).get("name", ""),
                          "arguments": orjson.dumps(c.tool_arguments(call)).decode()}}
            for call in m.tool_calls]
        if m.text():
            out["tool_plan"] = m.text()
    elif m.text():
        out["content"] = m.text()
    else:
        return None  # an empty assistant turn: Cohere rejects it, and it says nothing
    return out


def to_cohere(req: ChatCompletionRequest, model: str) -> Body:
    """The ``/v2/chat`` request body for ``req`` (``stream`` not set).

    Raises:
        InvalidParameterValue: images or reasoning in messages, a bad tool, tool choice or
            schema, or ``parallel_tool_calls: false``.
    """
    messages = [b for i, m in enumerate(req.messages) if (b := _message(i, m)) is not None]
    body: Body = {"model": model, "messages": messages}
    tools = c.tools_of(req)
    choice = c.tool_choice_of(req, tools)
    if tools:
        if req.parallel_tool_calls is False:
            raise InvalidParameterValue("parallel_tool_calls=false is not supported by provider "
                                        "cohere (it cannot limit an answer to one tool call).")
        if choice not in (None, "auto", "none", "required"):
            tools = [t for t in tools if t.name == choice]  # no named choice in Cohere
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": t.parameters}} for t in tools]
        if choice == "none":
            body["tool_choice"] = "NONE"
        elif choice not in (None, "auto"):
            body["tool_choice"] = "REQUIRED"
    kind, schema, _ = c.response_schema(req)
    if kind != "text":
        body["response_format"] = {"type": "json_object", **(
            {"json_schema": schema} if schema is not None else {})}
    extra = req.model_extra or {}
    for key, value in (("max_tokens", req.effective_max_tokens()),
                       ("temperature", req.temperature), ("p", req.top_p), ("k", req.top_k),
                       ("seed", req.seed), ("frequency_penalty", extra.get("frequency_penalty")),
                       ("presence_penalty", extra.get("presence_penalty")),
                       ("stop_sequences", req.stop)):
        if value is not None:
            body[key] = value
    body.update(req.extra_params or {})
    return body


def from_cohere(data: Body) -> tuple[c.Answer, dict[str, int]]:
    """An answer and usage from a ``/v2/chat`` response body."""
    msg = data.get("message") or {}
    ans = c.Answer()
    content = msg.get("content") or []
    if isinstance(content, str):
        ans.text = content
    else:
        ans.text = "".join(b.get("text") or "" for b in content
                           if isinstance(b, dict) and b.get("type") == "text")
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        ans.tool_calls.append(c.tool_call(call.get("id") or c.new_call_id(),
                                          fn.get("name", ""), fn.get("arguments") or "{}"))
    ans.finish_reason = finish_reason(data.get("finish_reason"))
    if ans.tool_calls and ans.finish_reason == "stop":
        ans.finish_reason = "tool_calls"
    return ans, c.usage(*usage_of(data.get("usage")))


# -- backend ---------------------------------------------------------------------------------
class CohereBackend(ExternalBackend):
    """Cohere v2 chat / embed (see the module docstring for formats and mappings)."""

    provider = "cohere"
    supported_params = frozenset({"top_k", "seed", "frequency_penalty", "presence_penalty"})
    chat_features = Capabilities(tools=True, json_schema=True, vision=False, reasoning=False)

    def check_config(self) -> None:
        self.credential("cohere_api_key")
        base = str(self.option("cohere_api_base", DEFAULT_BASE))
        if not base.startswith(("http://", "https://")):
            raise self.config_error(f"cohere_api_base must be an http(s) URL, got '{base}'")
        self.base = base.rstrip("/")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential('cohere_api_key')}",
                "Accept": "application/json"}

    def _request(self, req: ChatCompletionRequest) -> Body:
        self.reject_unsupported(req)
        if req.has_images():
            raise InvalidParameterValue(f"Image input is not supported by served entity "
                                        f"'{self.name}' (provider cohere).")
        if req.wants_reasoning():
            raise InvalidParameterValue(f"Reasoning (thinking / reasoning_effort) is not "
                                        f"supported by served entity '{self.name}' "
                                        f"(provider cohere).")
        return to_cohere(req, self.model)

    async def chat(self, req: ChatCompletionRequest) -> Body:
        """A chat completion body; ``n`` > 1 by concurrent calls.

        Raises:
            InvalidParameterValue: see :func:`to_cohere`; BadGateway: an answer that does not
            match ``response_format``; mapped provider errors (``provider_error``).
        """
        body = self._request(req)

        async def once(r: ChatCompletionRequest) -> Body:
            data = await self.upstream.send(f"{self.base}/v2/chat", body, self._headers())
            ans, u = from_cohere(data)
            if not ans.tool_calls:
                c.check_structured(ans.text, r)
            return c.chat_answer([ans], u)

        return await self.chat_n(req, once)

    def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        body = self._request(req)
        if req.n != 1:
            raise InvalidParameterValue("Streaming with n > 1 is not supported by provider "
                                        "cohere.")
        return self._stream({**body, "stream": True}, req)

    async def _stream(self, body: Body, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        headers = {**self._headers(), "Accept": "text/event-stream"}
        async for chunk in self.upstream.stream(f"{self.base}/v2/chat", body, headers,
                                                lambda resp: self._chunks(resp, req)):
            yield chunk

    async def _chunks(self, resp: Any, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        w = c.ChunkWriter()
        calls = False
        async for name, data in sse_events(resp):
            try:
                ev = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise BadGateway(f"cohere sent a stream event that is not JSON: "
                                 f"{data[:200]!r}") from None
            kind = ev.get("type") or name
            msg = ((ev.get("delta") or {}).get("message") or {})
            if kind == "message-start":
                yield w.start()
            elif kind == "content-delta":
                text = (msg.get("content") or {}).get("text") or ""
                if text:
                    yield w.text_delta(text)
            elif kind == "tool-call-start":
                tc = msg.get("tool_calls") or {}
                fn = tc.get("function") or {}
                calls = True
                yield w.tool_start(ev.get("index", 0), tc.get("id") or c.new_call_id(),
                                   fn.get("name", ""), fn.get("arguments") or "")
            elif kind == "tool-call-delta":
                args = ((msg.get("tool_calls") or {}).get("function") or {}).get("arguments")
                if args:
                    yield w.tool_args(ev.get("index", 0), args)
            elif kind == "message-end":
                delta = ev.get("delta") or {}
                w.prompt_tokens, w.completion_tokens = usage_of(delta.get("usage"))
                reason = finish_reason(delta.get("finish_reason"))
                if not calls:
                    c.check_structured(w.text, req)
                yield w.finish(reason)
                return
            elif kind in ("error", "") and ev.get("message"):
                raise BadGateway(f"cohere stream error: {ev['message']}")
        raise BadGateway("The stream from cohere ended without message-end.")

    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        """float32 vectors for ``req.texts()`` (batches of 96), tokens from billed_units.

        Raises:
            BadGateway: an answer without ``embeddings.float`` or with the wrong count.
        """
        texts = req.texts()
        base: Body = {"model": self.model, "input_type": "search_document",
                      "embedding_types": ["float"]}
        if req.dimensions is not None:
            base["output_dimension"] = req.dimensions
        base.update(self.extra_params(req))
        batches = [texts[i:i + EMBED_BATCH] for i in range(0, len(texts), EMBED_BATCH)]
        answers = await asyncio.gather(*(
            self.upstream.send(f"{self.base}/v2/embed", {**base, "texts": b}, self._headers())
            for b in batches))
        vectors: list[list[float]] = []
        tokens = 0
        for batch, data in zip(batches, answers, strict=True):
            floats = (data.get("embeddings") or {}).get("float")
            if not isinstance(floats, list) or len(floats) != len(batch):
                raise BadGateway(f"cohere answered {len(floats or [])} float embeddings for "
                                 f"{len(batch)} texts.")
            vectors.extend(floats)
            tokens += int(((data.get("meta") or {}).get("billed_units") or {})
                          .get("input_tokens") or 0)
        return EmbeddingResult(np.asarray(vectors, dtype=np.float32), tokens)
