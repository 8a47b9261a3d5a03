"""OpenAI-compatible providers: ``openai`` (+ Azure), ``custom``, ``databricks-model-serving``.

These APIs already speak fmserve's internal format (OpenAI chat completions), so this is
the gateway's fast path: the request is dumped once, ``model`` set to the upstream id,
``extra_params`` merged, and the answer passed back after minimal normalisation
(``id``/``model``/``created`` dropped, ``usage.reasoning_tokens`` filled in, ``reasoning_content``
turned into reasoning content blocks, ``response_format`` answers validated).

Configs (spec §2.4 field names):

* ``openai_config``: ``openai_api_key[_plaintext]``, ``openai_api_base`` (default
  ``https://api.openai.com/v1``), ``openai_api_type`` ``openai`` | ``azure`` | ``azuread``,
  ``openai_api_version``, ``openai_deployment_name``, ``openai_organization`` (sent as
  ``OpenAI-Organization``), ``microsoft_entra_client_id``,
  ``microsoft_entra_client_secret[_plaintext]``, ``microsoft_entra_tenant_id``.
  Azure: ``{openai_api_base}/openai/deployments/{openai_deployment_name}/chat/completions
  ?api-version={openai_api_version}`` with header ``api-key``; ``azuread`` sends a Microsoft
  Entra client-credentials token (scope ``https://cognitiveservices.azure.com/.default``) as
  ``Bearer``, cached until 5 minutes before it expires (or ``openai_api_key`` used as the
  bearer token when no Entra client is configured).
  fmserve extension: ``microsoft_entra_authority_host`` — base URL of the token endpoint
  (default ``https://login.microsoftonline.com``; the token is POSTed to
  ``{host}/{tenant}/oauth2/v2.0/token``).
* ``custom_provider_config``: ``custom_provider_url`` (the OpenAI-compatible base, e.g.
  ``http://host:8000/v1``), at most one of ``api_key_auth {key, value | value_plaintext}``
  (header ``key: value``) or ``bearer_token_auth {token | token_plaintext}``; fmserve also
  allows neither (a local server without auth).
* ``databricks_model_serving_config``: ``databricks_workspace_url`` (required),
  ``databricks_api_token[_plaintext]``; calls ``{workspace}/serving-endpoints/chat/completions``
  (``/completions``, ``/embeddings``) with ``model`` = the remote endpoint name.

Wire formats: https://platform.openai.com/docs/api-reference/chat/create (streaming:
``chat.completion.chunk`` events, ``stream_options.include_usage`` final usage chunk,
``data: [DONE]``), /docs/api-reference/embeddings/create, /docs/api-reference/completions;
Azure: learn.microsoft.com/azure/ai-services/openai/reference; Entra client credentials:
learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow.

Errors: provider HTTP errors are mapped by :func:`~fmserve.providers.upstream.provider_error`;
an ``{"error": ...}`` event inside a stream is mapped the same way; a stream that ends
without ``data: [DONE]`` is a 502 (:class:`~fmserve.errors.BadGateway`); an answer that
does not match ``response_format`` is a 502.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np

from fmserve.backends import EmbeddingResult
from fmserve.errors import BadGateway
from fmserve.oauth_tokens import TokenSource
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.protocol.responses import effort_for
from fmserve.providers import common
from fmserve.providers.base import Body, ExternalBackend, ProviderContext
from fmserve.providers.openai_stream import (
    chat_chunks,
    completion_chunks,
    message_text,
    normalise_message,
    openai_usage,
    reasoning_chars,
    strip_head,
)

OPENAI_BASE = "https://api.openai.com/v1"
ENTRA_HOST = "https://login.microsoftonline.com"
ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"

_OPENAI_PARAMS = frozenset({"seed", "frequency_penalty", "presence_penalty", "logit_bias",
                            "logprobs", "top_logprobs", "user", "service_tier", "store",
                            "metadata", "prediction", "modalities", "verbosity", "dimensions"})
_INTERNAL = ("extra_params", "client_request_id", "usage_context")


class OpenAICompatBackend(ExternalBackend):
    """Base of the three OpenAI-compatible providers (set URL and headers per provider)."""

    supported_params: ClassVar[frozenset[str]] = _OPENAI_PARAMS | {"top_k"}
    native_n: ClassVar[bool] = True
    include_usage: ClassVar[bool] = True  # ask for the final usage chunk
    send_encoding_format: ClassVar[bool] = True

    base: str = ""
    headers: dict[str, str]

    def url(self, route: str) -> str:
        """``route`` is ``chat/completions``, ``completions`` or ``embeddings``."""
        return f"{self.base}/{route}"

    async def auth_headers(self) -> dict[str, str]:
        return self.headers

    # -- request translation ---------------------------------------------------------
    def adapt(self, body: Body, req: ChatCompletionRequest) -> None:
        """Provider-specific changes to the outbound chat body (in place)."""

    async def to_openai(self, req: ChatCompletionRequest, stream: bool) -> tuple[Body, int]:
        """The outbound chat body (the request as sent, ``model`` = upstream id) and the
        estimated prompt tokens of its images (for a provider that reports no usage)."""
        self.reject_unsupported(req)
        if req.tools:
            common.tool_choice_of(req, common.tools_of(req))
        if req.response_format:
            common.response_schema(req)
        body, extra = self._dump(req)
        image_tokens = await self._inline_images(req, body) if req.has_images() else 0
        if stream:
            body["stream"] = True
            if self.include_usage:
                body["stream_options"] = {**(body.get("stream_options") or {}),
                                          "include_usage": True}
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        self.adapt(body, req)
        if extra:
            body.update(extra)
        return body, image_tokens

    def _dump(self, req: ChatCompletionRequest | CompletionRequest) -> tuple[Body, Any]:
        """The fields the caller set, fmserve's own dropped, ``model`` = upstream id; and
        the ``extra_params`` to merge last."""
        body = req.model_dump(exclude_unset=True)
        extra = body.pop("extra_params", None)
        for k in _INTERNAL:
            body.pop(k, None)
        body["model"] = self.model
        return body, extra

    async def _inline_images(self, req: ChatCompletionRequest, body: Body) -> int:
        """Every image part of ``body`` as a data URL; returns the images' tokens."""
        images = await self.load_images(req)
        for mi, (msg, out) in enumerate(zip(req.messages, body["messages"], strict=True)):
            if not isinstance(msg.content, list):
                continue
            new = []
            for pi, part in enumerate(common.parts(msg)):
                if common.image_url_of(part) is not None:
                    iu = part.get("image_url")
                    detail = iu.get("detail") if isinstance(iu, dict) else None
                    url: dict[str, Any] = {"url": images.get(mi, pi).data_url()}
                    if detail:
                        url["detail"] = detail
                    new.append({"type": "image_url", "image_url": url})
                else:
                    new.append(part)
            out["content"] = new
        return images.tokens

    # -- chat --------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> Body:
        """One chat completion (``n`` native).

        Raises:
            FmserveError: provider errors (mapped), 502 for an answer that breaks
                ``response_format``.
        """
        body, image_tokens = await self.to_openai(req, stream=False)
        answer = await self.upstream.send(self.url("chat/completions"), body,
                                          await self.auth_headers())
        return self.from_openai(answer, req, image_tokens)

    def from_openai(self, answer: Body, req: ChatCompletionRequest,
                    image_tokens: int = 0) -> Body:
        """The provider answer normalised in place (no id/model/created); without usage,
        prompt tokens are estimated from the text plus ``image_tokens``."""
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise BadGateway(f"{self.provider} answered without choices: "
                             f"{self.scrub(str(answer)[:200])}")
        strip_head(answer)
        answer["object"] = "chat.completion"
        check = req.response_format and req.response_format.get("type") != "text"
        for choice in answer["choices"]:
            msg = choice.get("message") or {}
            normalise_message(msg)
            if check and choice.get("finish_reason") != "tool_calls" and not msg.get("tool_calls"):
                common.check_structured(message_text(msg), req)
        if not answer.get("usage"):  # e.g. a local OpenAI-compatible server: estimate
            text = "".join(message_text(c.get("message") or {}) for c in answer["choices"])
            answer["usage"] = common.usage(req.estimated_prompt_tokens() + image_tokens,
                                           len(text) // 4)
        answer["usage"] = u = openai_usage(answer.get("usage"))
        if not u.get("reasoning_tokens"):
            chars = sum(reasoning_chars(c["message"]["content"]) for c in answer["choices"]
                        if isinstance((c.get("message") or {}).get("content"), list))
            if chars:  # reasoning came back but was not counted: estimate it
                u["reasoning_tokens"] = common.estimate_reasoning_tokens(chars)
        return answer

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        """Chat chunks: role first, cumulative usage on every chunk, stable tool indexes.

        Raises:
            FmserveError: provider errors before the first chunk; after it, mapped errors
                for an ``error`` event, a broken connection, or a stream without ``[DONE]``.
        """
        body, image_tokens = await self.to_openai(req, stream=True)
        async for chunk in self.upstream.stream(
                self.url("chat/completions"), body, await self.auth_headers(),
                lambda resp: chat_chunks(resp, req, self.provider, self.include_usage,
                                         image_tokens)):
            yield chunk

    # -- completions ---------------------------------------------------------------------
    def _completion_body(self, req: CompletionRequest, stream: bool) -> Body:
        self.reject_unsupported(req)
        body, extra = self._dump(req)
        body.pop("stream_options", None)
        if stream:
            body["stream"] = True
            if self.include_usage:
                body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream", None)
        if extra:
            body.update(extra)
        return body

    async def complete(self, req: CompletionRequest) -> Body:
        """Native ``/completions`` for ``llm/v1/completions`` models; chat ones via chat."""
        if self.task != "llm/v1/completions":
            return await super().complete(req)
        answer = await self.upstream.send(self.url("completions"),
                                          self._completion_body(req, False),
                                          await self.auth_headers())
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise BadGateway(f"{self.provider} answered without choices.")
        strip_head(answer)
        answer["object"] = "text_completion"
        if not answer.get("usage"):  # e.g. a local OpenAI-compatible server: estimate
            text = "".join(str(c.get("text") or "") for c in answer["choices"])
            answer["usage"] = common.usage(sum(len(p) for p in req.prompts()) // 4,
                                           len(text) // 4)
        answer["usage"] = openai_usage(answer.get("usage"))
        return answer

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[Body]:
        if self.task != "llm/v1/completions":
            async for chunk in super().complete_stream(req):
                yield chunk
            return
        async for chunk in self.upstream.stream(
                self.url("completions"), self._completion_body(req, True),
                await self.auth_headers(), lambda resp: completion_chunks(resp, self.provider)):
            yield chunk

    # -- embeddings ------------------------------------------------------------------------
    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        """``/embeddings``; base64 or float answers decoded to a float32 array.

        Raises:
            BadGateway: an answer without one vector per input.
        """
        if not self.capabilities.embeddings:
            raise self._unsupported("Embeddings")
        self.reject_unsupported(req)
        texts = req.texts()
        body: Body = {"model": self.model, "input": texts if len(texts) != 1 or
                      not isinstance(req.input, str) else texts[0]}
        if self.send_encoding_format:
            body["encoding_format"] = req.encoding_format
        for k in ("dimensions", "user"):
            if getattr(req, k) is not None:
                body[k] = getattr(req, k)
        body.update(self.extra_params(req))
        answer = await self.upstream.send(self.url("embeddings"), body, await self.auth_headers())
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            raise BadGateway(f"{self.provider} answered {len(data or [])} embeddings for "
                             f"{len(texts)} inputs.")
        data = sorted(data, key=lambda d: d.get("index", 0))
        rows = [np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
                if isinstance(e.get("embedding"), str)
                else np.asarray(e.get("embedding"), dtype=np.float32) for e in data]
        u = answer.get("usage") or {}
        return EmbeddingResult(np.vstack(rows).astype(np.float32, copy=False),
                               int(u.get("prompt_tokens") or u.get("total_tokens") or 0))

    # -- config helpers --------------------------------------------------------------------
    def nested_secret(self, obj: dict[str, Any], field: str, where: str) -> str:
        """``obj[field]`` or ``obj[field + '_plaintext']`` (one of them), resolved and scrubbed."""
        ref, plain = obj.get(field), obj.get(f"{field}_plaintext")
        if bool(ref) == bool(plain):
            raise self.config_error(f"{where} needs exactly one of '{field}' (a "
                                    f"{{{{secrets/scope/key}}}} reference) and "
                                    f"'{field}_plaintext'")
        return self.secret(str(ref or plain))

    def base_url(self, field: str, default: str | None = None) -> str:
        url = str(self.option(field, default) or "")
        if not url:
            raise self.config_error(f"'{field}' is required")
        if not url.startswith(("http://", "https://")):
            raise self.config_error(f"'{field}' must be an http(s) URL, got '{url}'")
        return url.rstrip("/")


class OpenAIBackend(OpenAICompatBackend):
    """``openai`` provider: OpenAI, Azure OpenAI (api key) and Azure AD (Entra ID)."""

    provider = "openai"
    supported_params = _OPENAI_PARAMS

    def check_config(self) -> None:
        kind = str(self.option("openai_api_type", "openai")).lower()
        if kind not in ("openai", "azure", "azuread"):
            raise self.config_error(f"openai_api_type must be openai, azure or azuread, "
                                    f"got '{kind}'")
        self.kind = kind
        self.headers = {}
        if kind == "openai":
            self.base = self.base_url("openai_api_base", OPENAI_BASE)
            self.headers["Authorization"] = f"Bearer {self.credential('openai_api_key')}"
            org = self.option("openai_organization")
            if org:
                self.headers["OpenAI-Organization"] = str(org)
            return
        for f in ("openai_api_base", "openai_deployment_name", "openai_api_version"):
            if not self.option(f):
                raise self.config_error(f"'{f}' is required for openai_api_type '{kind}'")
        self.base = self.base_url("openai_api_base")
        self.api_version = str(self.option("openai_api_version"))
        self.deployment = str(self.option("openai_deployment_name"))
        if kind == "azure":
            self.headers["api-key"] = str(self.credential("openai_api_key"))
            return
        self.entra = bool(self.option("microsoft_entra_client_id"))
        if not self.entra:
            self.headers["Authorization"] = f"Bearer {self.credential('openai_api_key')}"
            return
        for f in ("microsoft_entra_client_id", "microsoft_entra_tenant_id"):
            if not self.option(f):
                raise self.config_error(f"'{f}' is required for Microsoft Entra ID auth")
        self.client_secret = str(self.credential("microsoft_entra_client_secret"))
        self.token_url = (f"{self.base_url('microsoft_entra_authority_host', ENTRA_HOST)}/"
                          f"{self.option('microsoft_entra_tenant_id')}/oauth2/v2.0/token")
        self.tokens = TokenSource("Microsoft Entra ID", self._fetch_token,
                                  on_token=self._secrets.add)

    def url(self, route: str) -> str:
        if self.kind == "openai":
            return f"{self.base}/{route}"
        return (f"{self.base}/openai/deployments/{self.deployment}/{route}"
                f"?api-version={self.api_version}")

    async def auth_headers(self) -> dict[str, str]:
        if self.kind != "azuread" or not self.entra:
            return self.headers
        return {"Authorization": f"Bearer {await self.tokens.token()}"}

    async def _fetch_token(self) -> Any:
        """A Microsoft Entra client-credentials token request: the token endpoint's answer."""
        form = {"grant_type": "client_credentials",
                "client_id": str(self.option("microsoft_entra_client_id")),
                "client_secret": self.client_secret, "scope": ENTRA_SCOPE}
        return await self.connect("Microsoft Entra ID").send(
            self.token_url, data=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})

    def adapt(self, body: Body, req: ChatCompletionRequest) -> None:
        # OpenAI takes reasoning_effort, not thinking; it returns no reasoning text, so
        # prior reasoning blocks (from other providers) cannot be sent back: dropped.
        th = body.pop("thinking", None)
        if th is not None and "reasoning_effort" not in body:
            if th.get("type") in ("enabled", "adaptive"):
                body["reasoning_effort"] = effort_for(common.thinking_budget(
                    req, req.effective_max_tokens()))
        for m in body["messages"]:
            c = m.get("content")
            if isinstance(c, list) and m.get("role") == "assistant":
                kept = [p for p in c if p.get("type") != "reasoning"]
                if len(kept) != len(c):
                    m["content"] = kept or (None if m.get("tool_calls") else "")


class CustomBackend(OpenAICompatBackend):
    """``custom`` provider: any OpenAI-compatible server (vLLM, TGI, Ollama, LiteLLM, …)."""

    provider = "custom"

    def check_config(self) -> None:
        self.base = self.base_url("custom_provider_url")
        key_auth, bearer = self.config.get("api_key_auth"), self.config.get("bearer_token_auth")
        if key_auth and bearer:
            raise self.config_error("set only one of 'api_key_auth' and 'bearer_token_auth'")
        self.headers = {}
        if key_auth:
            if not isinstance(key_auth, dict) or not key_auth.get("key"):
                raise self.config_error("api_key_auth needs 'key' (the header name)")
            self.headers[str(key_auth["key"])] = self.nested_secret(key_auth, "value",
                                                                     "api_key_auth")
        elif bearer:
            if not isinstance(bearer, dict):
                raise self.config_error("bearer_token_auth must be an object")
            token = self.nested_secret(bearer, "token", "bearer_token_auth")
            self.headers["Authorization"] = f"Bearer {token}"


class DatabricksBackend(OpenAICompatBackend):
    """``databricks-model-serving``: an endpoint of another Databricks/fmserve workspace."""

    provider = "databricks-model-serving"
    include_usage = False  # Databricks puts cumulative usage on every chunk
    send_encoding_format = False

    def check_config(self) -> None:
        self.base = self.base_url("databricks_workspace_url") + "/serving-endpoints"
        token = self.credential("databricks_api_token")
        self.headers = {"Authorization": f"Bearer {token}"}


_CLASSES: dict[str, type[OpenAICompatBackend]] = {
    "openai": OpenAIBackend, "custom": CustomBackend,
    "databricks-model-serving": DatabricksBackend}


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> ExternalBackend:
    """The backend for an ``openai``, ``custom`` or ``databricks-model-serving`` model.

    Raises:
        InvalidParameterValue: a config with missing or conflicting fields.
    """
    return _CLASSES[model.provider](name, model, ctx)
