"""Amazon Bedrock (provider ``amazon-bedrock``): Converse / ConverseStream and InvokeModel.

Config (spec §2.4 ``amazon_bedrock_config``):

* ``aws_region`` (required), ``bedrock_provider`` (required: ``anthropic``, ``cohere``,
  ``ai21labs``, ``amazon``, ``grok``, … — decides thinking and embedding formats);
* ``aws_access_key_id[_plaintext]`` and ``aws_secret_access_key[_plaintext]`` (required);
  ``aws_session_token[_plaintext]`` (fmserve extension, for temporary credentials);
* ``instance_profile_arn`` / ``uc_service_credential_name``: Databricks-only ways of
  assuming an AWS role. fmserve cannot use them and does **not** fall back to botocore's
  default credential chain (that would silently use the gateway host's own identity):
  without access keys the config is a 400 that says so;
* ``bedrock_endpoint_url`` (fmserve extension): the Bedrock runtime base URL, default
  ``https://bedrock-runtime.{aws_region}.amazonaws.com`` (VPC endpoints, proxies, tests).

Every request is signed with AWS Signature V4 (``botocore.auth.SigV4Auth``, service
``bedrock``) over the exact bytes sent, and sent on the shared aiohttp session.

Wire formats (Bedrock API reference, ``bedrock-runtime``):

* chat: ``POST /model/{modelId}/converse`` and ``/converse-stream`` (Converse API,
  https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html):
  ``system [{text}]``, ``messages [{role, content: [ContentBlock]}]`` with ``text``,
  ``image {format, source {bytes}}``, ``toolUse {toolUseId, name, input}``, ``toolResult
  {toolUseId, content [{text}|{json}], status}`` and ``reasoningContent {reasoningText
  {text, signature}} | {redactedContent}``; ``inferenceConfig {maxTokens, temperature,
  topP, stopSequences}``; ``toolConfig {tools [{toolSpec {name, description, inputSchema
  {json}}}], toolChoice {auto|any|tool}}``; ``additionalModelRequestFields``.
  The stream is ``application/vnd.amazon.eventstream`` binary framing; ``:event-type``
  ``messageStart``, ``contentBlockStart``, ``contentBlockDelta``, ``contentBlockStop``,
  ``messageStop {stopReason}``, ``metadata {usage}``; ``:message-type exception`` frames
  (``throttlingException`` …) become mapped errors.
* embeddings: ``POST /model/{modelId}/invoke`` (InvokeModel) — ``amazon`` (Titan
  ``{"inputText"}`` → ``{"embedding", "inputTextTokenCount"}``, one call per text) and
  ``cohere`` (``{"texts", "input_type": "search_document"}`` → ``{"embeddings"}``, 96
  texts a call, tokens from ``X-Amzn-Bedrock-Input-Token-Count``).

Choices: ``tool_choice: "none"`` omits ``toolConfig`` (Converse has no "none"); with
tool calls in the history Bedrock requires ``toolConfig``, so that is a 400. ``thinking``
/ ``reasoning_effort`` → ``additionalModelRequestFields.thinking`` for ``anthropic`` only
(other Bedrock providers: 400). ``response_format`` json_schema/json_object → one forced
tool whose input is the answer, validated with ``check_structured``. ``top_k`` →
``additionalModelRequestFields.top_k`` (anthropic). Stop reasons ``end_turn``/
``stop_sequence`` → stop, ``max_tokens`` → length, ``tool_use`` → tool_calls,
``content_filtered``/``guardrail_intervened`` → content_filter.

Errors: the ``x-amzn-ErrorType`` header decides (``ThrottlingException`` → 429,
``ValidationException`` → 400, ``AccessDeniedException`` → 403, ``ModelTimeoutException``
→ 504, ``ServiceUnavailableException`` → 503, …), else the status as in
:func:`~fmserve.providers.base.provider_error`; the message is Bedrock's ``{"message"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import orjson
import yarl
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError

from fmserve.backends import EmbeddingResult
from fmserve.errors import (
    BadGateway,
    BadRequest,
    DeadlineExceeded,
    FmserveError,
    InvalidParameterValue,
    PermissionDenied,
    RequestLimitExceeded,
    TemporarilyUnavailable,
    Unauthenticated,
)
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import common as c
from fmserve.providers.base import (
    ExternalBackend,
    ProviderContext,
    provider_error,
    provider_message,
)
from fmserve.providers.images import Images, prepare_images

Body = dict[str, Any]

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "content_filtered": "content_filter",
                "guardrail_intervened": "content_filter",
                "model_context_window_exceeded": "length"}
# x-amzn-ErrorType / :exception-type (lower-camel in streams) → fmserve error class.
ERROR_TYPES: dict[str, type[FmserveError]] = {
    "throttlingexception": RequestLimitExceeded, "modelnotreadyexception": RequestLimitExceeded,
    "servicequotaexceededexception": RequestLimitExceeded,
    "validationexception": BadRequest, "resourcenotfoundexception": BadRequest,
    "accessdeniedexception": PermissionDenied, "unrecognizedclientexception": Unauthenticated,
    "invalidsignatureexception": PermissionDenied, "expiredtokenexception": Unauthenticated,
    "modeltimeoutexception": DeadlineExceeded, "serviceunavailableexception":
    TemporarilyUnavailable, "internalserverexception": BadGateway,
    "modelstreamerrorexception": BadGateway, "modelerrorexception": BadGateway,
}
COHERE_BATCH = 96  # Cohere Embed on Bedrock: at most 96 texts per call
STRUCTURED_TOOL = "json_response"


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> BedrockBackend:
    return BedrockBackend(name, model, ctx)


def bedrock_error(status: int, body: bytes | str, headers: Any = None,
                  error_type: str | None = None) -> FmserveError:
    """The fmserve error for a Bedrock error answer (HTTP or an exception stream frame)."""
    etype = error_type or (headers.get("x-amzn-ErrorType", "") if headers is not None else "")
    etype = etype.split(":")[0]
    cls = ERROR_TYPES.get(etype.lower())
    if cls is None:
        return provider_error("amazon-bedrock", status, body, headers)
    msg = f"amazon-bedrock returned {etype} (HTTP {status}): {provider_message(body)}"
    retry = {RequestLimitExceeded: 1, TemporarilyUnavailable: 5}.get(cls)
    if retry is not None and headers is not None and headers.get("retry-after"):
        retry = max(1, int(float(headers["retry-after"]) + 0.999))
    return cls(msg, retry_after=retry)


# -- request translation -------------------------------------------------------------------
def _tool_result(msg: Any) -> Body:
    text = msg.text()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    block = {"json": value} if isinstance(value, dict) else {"text": text}
    return {"toolResult": {"toolUseId": msg.tool_call_id or "", "content": [block],
                           "status": "success"}}


def _blocks(req: ChatCompletionRequest, i: int, images: Images | None) -> tuple[str, list[Body]]:
    msg = req.messages[i]
    if msg.role == "tool":
        return "user", [_tool_result(msg)]
    out: list[Body] = []
    if msg.role == "assistant":
        for r in c.reasoning_of(msg):
            if r.encrypted is not None:
                out.append({"reasoningContent": {"redactedContent": r.encrypted}})
            else:
                rt: Body = {"text": r.text}
                if r.signature:
                    rt["signature"] = r.signature
                out.append({"reasoningContent": {"reasoningText": rt}})
    for pi, p in enumerate(c.parts(msg)):
        if p.get("type") == "text" and p.get("text"):
            out.append({"text": p["text"]})
        elif c.image_url_of(p) is not None and images is not None:
            img = images.get(i, pi)
            out.append({"image": {"format": img.media_type.split("/")[1],
                                  "source": {"bytes": img.b64()}}})
    for call in msg.tool_calls or []:
        out.append({"toolUse": {"toolUseId": call.get("id") or c.new_call_id(),
                                "name": (call.get("function") or {}).get("name", ""),
                                "input": c.tool_arguments(call)}})
    return ("assistant" if msg.role == "assistant" else "user"), out


def to_converse(req: ChatCompletionRequest, bedrock_provider: str,
                images: Images | None = None) -> Body:
    """The Converse request body for ``req`` (model id goes in the URL).

    Raises:
        InvalidParameterValue: thinking for a non-anthropic model, tool_choice none with
            tool history, response_format together with tools, a bad tool or schema.
    """
    body: Body = {}
    system = [{"text": m.text()} for m in req.messages if m.role in ("system", "developer")
              and m.text()]
    messages: list[Body] = []
    for i, m in enumerate(req.messages):
        if m.role in ("system", "developer"):
            continue
        role, blocks = _blocks(req, i, images)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:  # Bedrock wants alternating roles
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    if system:
        body["system"] = system
    body["messages"] = messages
    max_tokens = req.effective_max_tokens()
    extra: Body = {}
    budget = c.thinking_budget(req, max_tokens)
    if budget is not None:
        if bedrock_provider != "anthropic":
            raise InvalidParameterValue(
                f"thinking / reasoning_effort is only supported for bedrock_provider "
                f"'anthropic' on amazon-bedrock, not '{bedrock_provider}'.")
        extra["thinking"] = {"type": "enabled", "budget_tokens": budget}
        max_tokens = max_tokens or budget + 4096
    if req.top_k is not None:
        if bedrock_provider != "anthropic":
            raise InvalidParameterValue("top_k is only supported for bedrock_provider "
                                        "'anthropic'; pass it in extra_params.")
        extra["top_k"] = req.top_k
    inference: Body = {}
    for key, value in (("maxTokens", max_tokens), ("temperature", req.temperature),
                       ("topP", req.top_p), ("stopSequences", req.stop)):
        if value is not None:
            inference[key] = value
    if inference:
        body["inferenceConfig"] = inference
    tools = c.tools_of(req)
    choice = c.tool_choice_of(req, tools)
    kind, schema, _ = c.response_schema(req)
    if kind != "text":
        if tools:
            raise InvalidParameterValue("response_format together with tools is not "
                                        "supported by amazon-bedrock.")
        tools = [c.Tool(STRUCTURED_TOOL, "Answer with this tool; its input is the answer.",
                        schema or {"type": "object"})]
        choice = STRUCTURED_TOOL
    has_tool_blocks = any("toolUse" in b or "toolResult" in b
                          for m in messages for b in m["content"])
    if tools and choice == "none":
        if has_tool_blocks:
            raise InvalidParameterValue(
                "tool_choice 'none' is not supported by amazon-bedrock when the history has "
                "tool calls (Bedrock requires toolConfig then); use 'auto'.")
    elif tools:
        tc: Body = {"tools": [{"toolSpec": {"name": t.name, **(
            {"description": t.description} if t.description else {}),
            "inputSchema": {"json": t.parameters}}} for t in tools]}
        if choice in (None, "auto"):
            tc["toolChoice"] = {"auto": {}}
        elif choice == "required":
            tc["toolChoice"] = {"any": {}}
        else:
            tc["toolChoice"] = {"tool": {"name": choice}}
        body["toolConfig"] = tc
    if extra:
        body["additionalModelRequestFields"] = extra
    for key, value in (req.extra_params or {}).items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def from_converse(data: Body, structured: bool) -> tuple[c.Answer, dict[str, int]]:
    """An answer and usage from a Converse response body."""
    ans = c.Answer()
    content = ((data.get("output") or {}).get("message") or {}).get("content") or []
    for block in content:
        if "text" in block:
            ans.text += block["text"]
        elif "reasoningContent" in block:
            rc = block["reasoningContent"]
            if "redactedContent" in rc:
                ans.reasoning.append(c.Reasoning(encrypted=rc["redactedContent"]))
            else:
                rt = rc.get("reasoningText") or {}
                ans.reasoning.append(c.Reasoning(rt.get("text", ""), rt.get("signature")))
        elif "toolUse" in block:
            tu = block["toolUse"]
            if structured and tu.get("name") == STRUCTURED_TOOL:
                ans.text += json.dumps(tu.get("input"))
            else:
                ans.tool_calls.append(c.tool_call(tu.get("toolUseId") or c.new_call_id(),
                                                  tu.get("name", ""), tu.get("input") or {}))
    reason = STOP_REASONS.get(data.get("stopReason") or "", "stop")
    if structured and reason == "tool_calls":
        reason = "stop"
    ans.finish_reason = reason
    u = data.get("usage") or {}
    return ans, c.usage(int(u.get("inputTokens", 0)), int(u.get("outputTokens", 0)))


# -- the backend ---------------------------------------------------------------------------
class BedrockBackend(ExternalBackend):
    """Chat (Converse) and embeddings (InvokeModel) on Amazon Bedrock; see the module doc."""

    provider = "amazon-bedrock"
    supported_params = frozenset({"top_k"})

    def check_config(self) -> None:
        self.region = str(self.option("aws_region") or "")
        self.bedrock_provider = str(self.option("bedrock_provider") or "")
        if not self.region:
            raise self.config_error("'aws_region' is required")
        if not self.bedrock_provider:
            raise self.config_error("'bedrock_provider' is required (anthropic, cohere, "
                                    "ai21labs, amazon, …)")
        has_keys = any(self.config.get(k) for k in (
            "aws_access_key_id", "aws_access_key_id_plaintext", "aws_secret_access_key",
            "aws_secret_access_key_plaintext"))
        if not has_keys:
            how = [k for k in ("instance_profile_arn", "uc_service_credential_name")
                   if self.config.get(k)]
            raise self.config_error(
                (f"{' and '.join(how)} cannot be used by fmserve (it does not assume AWS "
                 f"roles); " if how else "") +
                "give 'aws_access_key_id' and 'aws_secret_access_key' (secret references or "
                "*_plaintext values)")
        key_id = self.credential("aws_access_key_id")
        secret = self.credential("aws_secret_access_key")
        token = self.credential("aws_session_token", required=False)
        self.credentials = Credentials(str(key_id), str(secret), token)
        default = f"https://bedrock-runtime.{self.region}.amazonaws.com"
        self.base_url = str(self.option("bedrock_endpoint_url", default)).rstrip("/")
        if self.task == "llm/v1/embeddings" and self.bedrock_provider not in ("amazon",
                                                                              "cohere"):
            raise self.config_error(f"embeddings need bedrock_provider 'amazon' (Titan) or "
                                    f"'cohere', not '{self.bedrock_provider}'")
        if self.task == "llm/v1/chat" and self.bedrock_provider != "anthropic":
            self.capabilities = dataclasses.replace(self.capabilities, reasoning=False)

    # -- HTTP ------------------------------------------------------------------------------
    def url(self, action: str) -> str:
        return f"{self.base_url}/model/{quote(self.model, safe='')}/{action}"

    def sign(self, url: str, data: bytes, accept: str) -> dict[str, str]:
        """SigV4 headers for a POST of exactly ``data`` to ``url``."""
        req = AWSRequest(method="POST", url=url, data=data,
                         headers={"Content-Type": "application/json", "Accept": accept})
        SigV4Auth(self.credentials, "bedrock", self.region).add_auth(req)
        return dict(req.headers.items())

    async def _open(self, action: str, body: Body, accept: str) -> aiohttp.ClientResponse:
        """Sign and POST; return the open response (errors mapped, caller releases)."""
        url = self.url(action)
        data = orjson.dumps(body)
        headers = self.sign(url, data, accept)
        try:
            resp = await self.ctx.http.session().post(yarl.URL(url, encoded=True), data=data,
                                                      headers=headers)
            if resp.status >= 400:
                raw = await resp.read()
                resp.release()
                raise bedrock_error(resp.status, raw, resp.headers)
            return resp
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._fail(exc) from None

    async def _post(self, action: str, body: Body) -> tuple[Body, Any]:
        """Sign, POST and decode the JSON answer; returns ``(body, headers)``."""
        resp = await self._open(action, body, "application/json")
        try:
            raw = await resp.read()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._fail(exc) from None
        finally:
            resp.release()
        try:
            return orjson.loads(raw), resp.headers
        except orjson.JSONDecodeError:
            raise BadGateway(f"amazon-bedrock answered with a body that is not JSON: "
                             f"{self.scrub(raw[:200].decode('utf-8', 'replace'))}") from None

    # -- chat ------------------------------------------------------------------------------
    async def _request(self, req: ChatCompletionRequest) -> tuple[Body, Images | None]:
        self.reject_unsupported(req)
        images = await prepare_images(req, self) if req.has_images() else None
        return to_converse(req, self.bedrock_provider, images), images

    async def chat(self, req: ChatCompletionRequest) -> Body:
        return await self.chat_n(req, self._chat_once)

    async def _chat_once(self, req: ChatCompletionRequest) -> Body:
        body, _ = await self._request(req)
        structured = c.response_schema(req)[0] != "text"
        data, _ = await self._post("converse", body)
        answer, usage = from_converse(data, structured)
        if structured:
            c.check_structured(answer.text, req)
        return c.chat_answer([answer], usage)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        if req.n != 1:
            raise InvalidParameterValue("Streaming from amazon-bedrock takes n = 1.")
        body, _ = await self._request(req)
        resp = await self._open("converse-stream", body, "application/vnd.amazon.eventstream")
        async for chunk in self.guard_stream(self._chunks(resp, req), resp):
            yield chunk

    async def _chunks(self, resp: aiohttp.ClientResponse,
                      req: ChatCompletionRequest) -> AsyncIterator[Body]:
        structured = c.response_schema(req)[0] != "text"
        w = c.ChunkWriter()
        yield w.start()
        kinds: dict[int, str] = {}
        stop: str | None = None
        async for event, payload in event_stream(resp):
            if event == "contentBlockStart":
                tu = (payload.get("start") or {}).get("toolUse")
                idx = int(payload.get("contentBlockIndex", 0))
                if tu and structured and tu.get("name") == STRUCTURED_TOOL:
                    kinds[idx] = "structured"
                elif tu:
                    kinds[idx] = "tool"
                    yield w.tool_start(idx, tu.get("toolUseId") or c.new_call_id(),
                                       tu.get("name", ""))
            elif event == "contentBlockDelta":
                idx = int(payload.get("contentBlockIndex", 0))
                delta = payload.get("delta") or {}
                if "text" in delta:
                    yield w.text_delta(delta["text"])
                elif "toolUse" in delta:
                    frag = (delta["toolUse"] or {}).get("input", "")
                    if kinds.get(idx) == "structured":
                        yield w.text_delta(frag)
                    elif frag and kinds.get(idx) == "tool":
                        yield w.tool_args(idx, frag)
                elif "reasoningContent" in delta:
                    rc = delta["reasoningContent"]
                    if "redactedContent" in rc:
                        yield w.reasoning_delta(encrypted=rc["redactedContent"])
                    elif rc.get("signature"):
                        yield w.reasoning_delta("", rc["signature"])
                    elif rc.get("text"):
                        yield w.reasoning_delta(rc["text"])
            elif event == "messageStop":
                stop = STOP_REASONS.get(payload.get("stopReason") or "", "stop")
            elif event == "metadata":
                if stop is None:
                    break
                u = payload.get("usage") or {}
                w.prompt_tokens = int(u.get("inputTokens", 0))
                w.completion_tokens = int(u.get("outputTokens", 0))
                if structured:
                    c.check_structured(w.text, req)
                    stop = "stop" if stop == "tool_calls" else stop
                yield w.finish(stop)
                return
        raise BadGateway("The stream from amazon-bedrock ended without its messageStop and "
                         "metadata events.")

    # -- embeddings ------------------------------------------------------------------------
    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        if not self.capabilities.embeddings:
            raise self._unsupported("Embeddings")
        texts = req.texts()
        extra = dict(req.extra_params or {})
        if self.bedrock_provider == "amazon":
            if req.dimensions is not None:
                extra.setdefault("dimensions", req.dimensions)
            answers = await asyncio.gather(*(self._post("invoke", {"inputText": t, **extra})
                                             for t in texts))
            vectors = [a["embedding"] for a, _ in answers]
            tokens = sum(int(a.get("inputTextTokenCount", 0)) for a, _ in answers)
        else:
            if req.dimensions is not None:
                raise InvalidParameterValue("dimensions is not supported by Cohere embeddings "
                                            "on amazon-bedrock.")
            batches = [texts[i:i + COHERE_BATCH] for i in range(0, len(texts), COHERE_BATCH)]
            answers = await asyncio.gather(*(self._post("invoke", {
                "texts": b, "input_type": "search_document", **extra}) for b in batches))
            vectors, tokens = [], 0
            for a, headers in answers:
                emb = a.get("embeddings")
                vectors.extend(emb.get("float", []) if isinstance(emb, dict) else emb or [])
                tokens += int(headers.get("X-Amzn-Bedrock-Input-Token-Count", 0))
        if len(vectors) != len(texts):
            raise BadGateway(f"amazon-bedrock returned {len(vectors)} embeddings for "
                             f"{len(texts)} inputs.")
        return EmbeddingResult(np.asarray(vectors, dtype=np.float32), tokens)


async def event_stream(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Body]]:
    """``(event type, JSON payload)`` of an ``application/vnd.amazon.eventstream`` body.

    Raises:
        FmserveError: an exception frame (mapped like HTTP errors), or BadGateway for a
            corrupt frame (CRC mismatch, bad lengths) or a payload that is not JSON.
    """
    buf = EventStreamBuffer()
    async for data in resp.content.iter_any():
        buf.add_data(data)
        try:
            messages = list(buf)
        except ParserError as exc:
            raise BadGateway(f"The stream from amazon-bedrock is corrupt: {exc}") from None
        for m in messages:
            headers = m.headers
            try:
                payload = orjson.loads(m.payload) if m.payload else {}
            except orjson.JSONDecodeError:
                raise BadGateway("amazon-bedrock sent a stream event that is not JSON: "
                                 f"{m.payload[:200]!r}") from None
            kind = headers.get(":message-type", "event")
            if kind == "exception":
                raise bedrock_error(400, m.payload, None,
                                    str(headers.get(":exception-type", "")))
            if kind == "error":
                raise bedrock_error(500, json.dumps({"message": headers.get(
                    ":error-message", "")}), None, str(headers.get(":error-code", "")))
            yield str(headers.get(":event-type", "")), payload
