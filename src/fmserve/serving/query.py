"""Answering queries: task dispatch, routing to a served entity, response shaping.

Entry points take the caller's :class:`~fmserve.gateway.policy.RequestContext` and return
``(served_entity_name, body_or_stream, extra_headers)``:

* :meth:`QueryService.invocations` — ``/serving-endpoints/{name}/invocations``: the
  body's keys decide the kind (``messages`` → chat, ``prompt`` → completions,
  ``input`` → embeddings), checked against the endpoint's task.
* :meth:`QueryService.chat` / :meth:`completions` / :meth:`embeddings` — the
  OpenAI-compatible routes, ``model`` = endpoint name.

Streams are async iterators of chunk dicts (spec §8.3); the HTTP layer frames them.

Every query passes the gateway policy: :meth:`GatewayPolicy.admit` after the endpoint is
found (404 first, then 403 without ``CAN_QUERY``) and before the body is validated or a
backend called; :meth:`GatewayPolicy.settle` when the answer is complete, the stream has
ended or the call failed.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import orjson

from fmserve.errors import FmserveError, InvalidParameterValue
from fmserve.gateway.policy import Admission, GatewayPolicy, RequestContext
from fmserve.gateway.usage import Demand, Outcome
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.schemas import preload, unchecked_schemas
from fmserve.protocol.stream_aggregate import StreamAggregator
from fmserve.protocol.validation import parse_model
from fmserve.serving.endpoints import (
    TASK_CHAT,
    TASK_COMPLETIONS,
    TASK_EMBEDDINGS,
    EndpointRegistry,
    ServedEntity,
    ServingEndpoint,
    served_entity_id,
)

Body = dict[str, Any]
OPENAI_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default on /v1/completions
Result = tuple[str, Body | AsyncIterator[Body], dict[str, str]]

_KIND_TASKS = {
    "chat": (TASK_CHAT,),
    "completions": (TASK_COMPLETIONS, TASK_CHAT),  # chat models also answer prompts
    "embeddings": (TASK_EMBEDDINGS,),
}
_KIND_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


def _kind_of(body: Body, task: str) -> str:
    present = [k for k, f in _KIND_FIELD.items() if f in body]
    if len(present) > 1:
        fields = " and ".join(f"'{_KIND_FIELD[k]}'" for k in present)
        raise InvalidParameterValue(f"The request has both {fields}; send only one.")
    if present:
        return present[0]
    expected = {"llm/v1/chat": "messages", "llm/v1/completions": "prompt",
                "llm/v1/embeddings": "input"}.get(task, "messages")
    raise InvalidParameterValue(f"Missing required parameter '{expected}' for a {task} endpoint.")


class QueryService:
    def __init__(self, registry: EndpointRegistry, policy: GatewayPolicy,
                 rng: random.Random | None = None, default_max_tokens: int = 4096) -> None:
        self.registry = registry
        self.policy = policy
        self.default_max_tokens = default_max_tokens
        self.rng = rng or random.Random()

    # -- routing -------------------------------------------------------------
    def _candidates(self, ep: ServingEndpoint, served_model: str | None) -> list[ServedEntity]:
        """Entities to try in order: the routed one, then (fallback enabled) the others.

        ``ai_gateway.fallback_config.enabled``: on a 5xx from the chosen entity the
        other served entities are tried in served-entity-list order (spec §11).
        """
        if served_model:
            return [ep.entity(served_model)]
        first = ep.pick(self.rng)
        fallback = ((ep.ai_gateway or {}).get("fallback_config") or {}).get("enabled")
        if not fallback:
            return [first]
        return [first, *(e for e in ep.entities if e is not first)]

    @staticmethod
    def _check_task(ep: ServingEndpoint, kind: str) -> None:
        if ep.task not in _KIND_TASKS[kind]:
            field = _KIND_FIELD[kind]
            raise InvalidParameterValue(
                f"Endpoint '{ep.name}' serves task {ep.task}; a {kind} request "
                f"('{field}') cannot be sent to it.")

    # -- entry points ----------------------------------------------------------
    async def invocations(self, ctx: RequestContext, name: str, body: Body,
                          served_model: str | None = None) -> Result:
        return await self._dispatch(ctx, None, name, body, served_model)

    async def chat(self, ctx: RequestContext, body: Body) -> Result:
        return await self._dispatch(ctx, "chat", _model(body), body, None)

    async def completions(self, ctx: RequestContext, body: Body) -> Result:
        """OpenAI legacy completions: ``max_tokens`` defaults to 16 (OpenAI API reference,
        "Create completion": "max_tokens … Defaults to 16")."""
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body = {**body, "max_tokens": OPENAI_COMPLETIONS_MAX_TOKENS}
        return await self._dispatch(ctx, "completions", _model(body), body, None)

    async def embeddings(self, ctx: RequestContext, body: Body) -> Result:
        return await self._dispatch(ctx, "embeddings", _model(body), body, None)

    def queryable(self, ctx: RequestContext) -> list[ServingEndpoint]:
        """The endpoints the caller may query (``GET /v1/models``)."""
        return [ep for ep in self.registry.all()
                if self.policy.allows(ctx.principal, ep, "CAN_QUERY")]

    async def _dispatch(self, ctx: RequestContext, kind: str | None, name: str, body: Body,
                        served_model: str | None) -> Result:
        """Find the endpoint (404), then under the gateway policy: permission (403), the
        body (400), rate limits (429), input guardrails (400; masking), the backend — with
        5xx fallback to the other served entities — output guardrails (400, or an error
        event mid-stream; masking) and the settlement of every outcome."""
        ep = self.registry.get(name)
        adm = self.policy.open(ctx, ep, streaming=body.get("stream") is True)
        adm.request_body = body
        cid = body.get("client_request_id")
        if isinstance(cid, str):  # known even when the body turns out invalid
            adm.ctx = replace(adm.ctx, client_request_id=cid[:128])
        try:
            self.policy.authorize(adm)
            if served_model:
                ep.entity(served_model)  # 404 for an unknown served entity
            kind = kind or _kind_of(body, ep.task)
            self._check_task(ep, kind)
            req: Any
            run: Any
            if kind == "chat":
                req, run = parse_model(ChatCompletionRequest, body), self._chat
            elif kind == "completions":
                req, run = parse_model(CompletionRequest, body), self._complete
            else:
                req, run = parse_model(EmbeddingsRequest, body), self._embed
            adm.ctx = replace(adm.ctx, client_request_id=req.client_request_id,
                              usage_context=req.usage_context)
            candidates = self._candidates(ep, served_model)
            await self.policy.admit(adm, await self._demand(kind, req, ep, candidates[0]))
            guard = self.policy.guardrails  # around whichever entity answers (fallbacks too)
            await guard.check_input(ep.ai_gateway, kind, req)
            entity, out = await self._call(ep, candidates, adm, run, req)
            out = (await guard.check_output(ep.ai_gateway, out, req) if isinstance(out, dict)
                   else guard.guard_stream(ep.ai_gateway, out, req))
        except FmserveError as exc:
            await self.policy.settle(adm, Outcome(exc.status_code, body=exc.to_body()))
            raise
        except asyncio.CancelledError:  # the client went away: settle in the background
            _background(self.policy.settle(adm, Outcome(499)))
            raise
        if isinstance(out, dict):
            await self.policy.settle(adm, Outcome(200, out.get("usage"), _output_chars(out),
                                                  out if adm.table else None))
        else:
            out = _settled(out, self.policy, adm)
        return entity.name, out, getattr(req, "response_headers", {})

    async def _call(self, ep: ServingEndpoint, candidates: list[ServedEntity],
                    adm: Admission, run: Any, req: Any
                    ) -> tuple[ServedEntity, Body | AsyncIterator[Body]]:
        last: FmserveError | None = None
        for entity in candidates:
            adm.ctx = replace(adm.ctx, served_entity=entity.name)
            adm.served_entity_id = served_entity_id(ep.id, ep.config_version, entity.name)
            try:
                entity.backend.before_request()
                return entity, await run(ep, entity, req)
            except FmserveError as exc:
                if exc.status_code < 500:
                    raise
                last = exc
        assert last is not None
        raise last

    async def _demand(self, kind: str, req: Any, ep: ServingEndpoint,
                entity: ServedEntity) -> Demand:
        """What the request may use, in tokens: its prompt plus ``max_tokens`` × ``n``.

        Under a tokens limit the prompt is counted by the routed entity's own tokenizer
        where it is local (:meth:`Backend.prompt_tokens`); otherwise (external models,
        embeddings) it is bounded by its UTF-8 JSON bytes plus the template's overhead.
        With a tokens limit and no ``max_tokens``, the request gets the server's default
        (``FMSERVE_MAX_TOKENS_DEFAULT``) so that the reservation bounds the answer."""
        if kind == "embeddings":
            texts = req.input if isinstance(req.input, list) else [req.input]
            chars = sum(len(t) for t in texts if isinstance(t, str))
            return Demand(chars, _bytes(texts) + 8 * len(texts), False)
        if kind == "chat":
            chars = sum(_text_chars(m.content) for m in req.messages)
            prompt = _bytes([m.model_dump(exclude_none=True) for m in req.messages]) + \
                _bytes(req.tools or []) + _bytes(req.response_format or {}) + 64
        else:
            chars = sum(len(p) for p in (req.prompt if isinstance(req.prompt, list)
                                         else [req.prompt]) if isinstance(p, str))
            prompt = _bytes(req.prompt) + 16
        cap = req.max_completion_tokens or req.max_tokens
        if _has_token_limit(ep):
            if cap is None:
                cap = req.max_tokens = self.default_max_tokens
            counted = await entity.backend.prompt_tokens(req)
            prompt = prompt if counted is None else counted
        answers = req.n * (len(req.prompts()) if kind == "completions" else 1)
        return Demand(chars, prompt + (cap or self.default_max_tokens) * answers, req.stream)

    # -- kinds -----------------------------------------------------------------
    async def _chat(self, ep: ServingEndpoint, entity: ServedEntity,
                    req: ChatCompletionRequest) -> Body | AsyncIterator[Body]:
        caps = entity.backend.capabilities
        caps.require("chat", "Chat", entity.name)
        if req.tools and req.tool_choice != "none":
            caps.require("tools", "Function calling (tools)", entity.name)
        if (req.response_format or {}).get("type") in ("json_object", "json_schema"):
            caps.require("json_schema", "Structured output (response_format)", entity.name)
        if req.has_images():
            caps.require("vision", "Image input", entity.name)
        if req.wants_reasoning():
            caps.require("reasoning", "Reasoning (thinking / reasoning_effort)", entity.name)
        todo = unchecked_schemas(req.tools, req.response_format)
        if todo:  # a large schema's metaschema check is slow pure Python: off the loop
            await asyncio.to_thread(preload, todo)
        head = _head("chatcmpl", ep.name)
        if req.stream:
            return await _primed(_stamp(entity.backend.chat_stream(req), head))
        return {**head, **await entity.backend.chat(req)}

    async def _complete(self, ep: ServingEndpoint, entity: ServedEntity,
                        req: CompletionRequest) -> Body | AsyncIterator[Body]:
        entity.backend.capabilities.require("completions", "Completions", entity.name)
        head = _head("cmpl", ep.name)
        if req.stream:
            return await _primed(_stamp(entity.backend.complete_stream(req), head))
        return {**head, **await entity.backend.complete(req)}

    async def _embed(self, ep: ServingEndpoint, entity: ServedEntity,
                     req: EmbeddingsRequest) -> Body:
        entity.backend.capabilities.require("embeddings", "Embeddings", entity.name)
        result = await entity.backend.embed(req)
        vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
        if req.encoding_format == "base64":
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.tobytes()).decode("ascii")}
                    for i, v in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors.tolist())]
        return {"object": "list", "model": ep.name, "data": data,
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens}}


def _model(body: Body) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise InvalidParameterValue(
            "Missing required parameter 'model': the serving endpoint name to query.")
    return model


def _head(prefix: str, model: str) -> Body:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


async def _stamp(chunks: AsyncIterator[Body], head: Body) -> AsyncIterator[Body]:
    """Adds the response ``id``/``created``/``model`` to every chunk."""
    try:
        async for chunk in chunks:
            yield {**head, **chunk}
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def _settled(chunks: AsyncIterator[Body], policy: GatewayPolicy,
                   adm: Admission) -> AsyncIterator[Body]:
    """The stream, then :meth:`GatewayPolicy.settle` with the last ``usage`` seen, the
    characters streamed and the outcome (200, the error's status, or 499 when the client
    went away) — before the stream ends, so a usage record is durable before ``[DONE]``.
    With an inference table the chunks are aggregated into the one body it stores."""
    usage = None
    status = 499
    chars = 0
    agg = StreamAggregator() if adm.table else None
    body: Any = None
    try:
        async for chunk in chunks:
            usage = chunk.get("usage") or usage
            chars += _output_chars(chunk)
            if agg is not None:
                agg.add(chunk)
            yield chunk
        status = 200
        body = agg.body() if agg is not None else None
    except FmserveError as exc:
        status = exc.status_code
        body = exc.to_body()
        raise
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        await policy.settle(adm, Outcome(status, usage, chars, body))


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") if isinstance(p, dict) else
                   len(getattr(p, "text", None) or "") for p in content)
    return 0


def _bytes(value: Any) -> int:
    """UTF-8 bytes of the JSON form: an upper bound on its tokens (byte-level BPE never
    makes a token of less than a byte)."""
    return len(orjson.dumps(value, default=str))


def _has_token_limit(ep: ServingEndpoint) -> bool:
    return any(lim.get("tokens") is not None
               for lim in [*((ep.ai_gateway or {}).get("rate_limits") or []),
                           *(ep.rate_limits or [])])


def _output_chars(body: Body) -> int:
    n = 0
    for choice in body.get("choices") or []:
        msg = choice.get("message") or choice.get("delta") or {}
        n += _text_chars(msg.get("content")) + len(choice.get("text") or "")
    return n


_PENDING: set[asyncio.Task[None]] = set()


def _background(work: Any) -> None:
    task = asyncio.ensure_future(work)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)


async def _primed(stream: AsyncIterator[Body]) -> AsyncIterator[Body]:
    """Pulls the first chunk now, so errors before any output raise here (as HTTP errors)."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise

    async def rest() -> AsyncIterator[Body]:
        try:
            if first is not None:
                yield first
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    return rest()
