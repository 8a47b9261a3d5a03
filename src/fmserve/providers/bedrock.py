"""Amazon Bedrock (provider ``amazon-bedrock``): Converse / ConverseStream and InvokeModel.

Config (spec §2.4 ``amazon_bedrock_config``):

* ``aws_region`` (required), ``bedrock_provider`` (required: ``anthropic``, ``cohere``,
  ``ai21labs``, ``amazon``, ``grok``, … — decides thinking and embedding formats);
* ``aws_access_key_id[_plaintext]`` and ``aws_secret_access_key[_plaintext]`` (required);
  ``aws_session_token[_plaintext]`` (fmserve extension, for temporary credentials);
* ``instance_profile_arn`` / ``uc_service_credential_name``: Databricks-only ways of
  assuming an AWS role. fmserve cannot use them and does **not** fall back to botocore's
  default credential chain (that would silently use the gateway host's own identity):
  without access keys the config is a 400 that says so (given with keys, the keys are
  used);
* ``bedrock_endpoint_url`` (fmserve extension): the Bedrock runtime base URL, default
  ``https://bedrock-runtime.{aws_region}.amazonaws.com`` (VPC endpoints, proxies, tests).

Every request is signed with AWS Signature V4 (``botocore.auth.SigV4Auth``, service
``bedrock``) over the exact bytes sent: :meth:`BedrockBackend.sign` is the upstream's
signing hook (a signed URL goes out exactly as signed — re-encoded, the model id's
``%3A`` would turn back into ``:`` and break the signature), and
:func:`~fmserve.providers.bedrock_converse.bedrock_error` its error hook (errors mapped by
their ``x-amzn-ErrorType`` header).

Wire formats (Bedrock API reference, ``bedrock-runtime``; translation in
:mod:`fmserve.providers.bedrock_converse`):

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
:func:`~fmserve.providers.upstream.provider_error`; the message is Bedrock's ``{"message"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fmserve.backends import EmbeddingResult
from fmserve.errors import BadGateway, InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import common as c
from fmserve.providers.base import ExternalBackend, ProviderContext
from fmserve.providers.bedrock_converse import (
    STOP_REASONS,
    STRUCTURED_TOOL,
    bedrock_error,
    event_stream,
    from_converse,
    to_converse,
)
from fmserve.providers.images import Images

Body = dict[str, Any]
COHERE_BATCH = 96  # Cohere Embed on Bedrock: at most 96 texts per call


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> BedrockBackend:
    return BedrockBackend(name, model, ctx)


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
    def upstream_hooks(self) -> dict[str, Any]:
        return {"sign": self.sign, "error": bedrock_error}

    def url(self, action: str) -> str:
        return f"{self.base_url}/model/{quote(self.model, safe='')}/{action}"

    def sign(self, method: str, url: str, data: bytes, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus the SigV4 ones for a request of exactly ``data`` to ``url``."""
        req = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(self.credentials, "bedrock", self.region).add_auth(req)
        return dict(req.headers.items())

    # -- chat ------------------------------------------------------------------------------
    async def _request(self, req: ChatCompletionRequest) -> tuple[Body, Images | None]:
        self.reject_unsupported(req)
        images = await self.load_images(req) if req.has_images() else None
        return to_converse(req, self.bedrock_provider, images), images

    async def chat(self, req: ChatCompletionRequest) -> Body:
        return await self.chat_n(req, self._chat_once)

    async def _chat_once(self, req: ChatCompletionRequest) -> Body:
        body, _ = await self._request(req)
        structured = c.response_schema(req)[0] != "text"
        data = await self.upstream.send(self.url("converse"), body,
                                        {"Accept": "application/json"})
        answer, usage = from_converse(data, structured)
        if structured:
            c.check_structured(answer.text, req)
        return c.chat_answer([answer], usage)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        if req.n != 1:
            raise InvalidParameterValue("Streaming from amazon-bedrock takes n = 1.")
        body, _ = await self._request(req)
        async for chunk in self.upstream.stream(
                self.url("converse-stream"), body,
                {"Accept": "application/vnd.amazon.eventstream"},
                lambda resp: self._chunks(resp, req)):
            yield chunk

    async def _chunks(self, resp: aiohttp.ClientResponse,
                      req: ChatCompletionRequest) -> AsyncIterator[Body]:
        structured = c.response_schema(req)[0] != "text"
        w = c.ChunkWriter()
        yield w.start()
        kinds: dict[int, str] = {}
        stop: str | None = None
        thought_chars = 0  # reasoning tokens are estimated (Converse reports none)
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
                        thought_chars += len(rc["text"])
                        w.reasoning_tokens = c.estimate_reasoning_tokens(thought_chars)
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
            answers = await asyncio.gather(*(self._invoke({"inputText": t, **extra})
                                             for t in texts))
            vectors = [a["embedding"] for a, _ in answers]
            tokens = sum(int(a.get("inputTextTokenCount", 0)) for a, _ in answers)
        else:
            if req.dimensions is not None:
                raise InvalidParameterValue("dimensions is not supported by Cohere embeddings "
                                            "on amazon-bedrock.")
            batches = [texts[i:i + COHERE_BATCH] for i in range(0, len(texts), COHERE_BATCH)]
            answers = await asyncio.gather(*(self._invoke({
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

    async def _invoke(self, body: Body) -> tuple[Body, Any]:
        """InvokeModel: ``(answer, response headers)``."""
        data, headers = await self.upstream.send_reply(self.url("invoke"), body,
                                                       {"Accept": "application/json"})
        return data, headers
