"""Google providers: ``google-cloud-vertex-ai`` (service-account OAuth) and ``google``
(the Gemini API with an API key — an fmserve extension).

Configs:

* ``google_cloud_vertex_ai_config`` (spec §2.4): ``region`` (required), ``project_id``
  (required unless the key file names one), ``private_key[_plaintext]``: a
  service-account JSON key (``client_email``, ``private_key`` PEM, ``token_uri``).
  fmserve extensions: ``vertex_ai_api_base`` (default
  ``https://{region}-aiplatform.googleapis.com``, ``https://aiplatform.googleapis.com``
  for region ``global``) and ``vertex_ai_token_url`` (overrides the key's ``token_uri``).
  Calls ``{base}/v1/projects/{project}/locations/{region}/publishers/google/models/
  {model}:generateContent`` (``:streamGenerateContent?alt=sse``; ``:predict`` for
  embeddings) with ``Authorization: Bearer <token>``. The token comes from the OAuth 2.0
  JWT bearer grant (RFC 7523; https://developers.google.com/identity/protocols/oauth2/
  service-account#authorizingrequests): a self-signed RS256 JWT (``iss`` = client email,
  ``scope`` = cloud-platform, ``aud`` = token URL, one hour) POSTed as
  ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>``; the access
  token is cached until 5 minutes before it expires.
* ``google_config``: ``google_api_key[_plaintext]``, ``google_api_base`` (default
  ``https://generativelanguage.googleapis.com``). Calls ``{base}/v1beta/models/{model}:
  generateContent`` (``:streamGenerateContent?alt=sse``, ``:batchEmbedContents``) with
  header ``x-goog-api-key`` (https://ai.google.dev/api).

Translation: :mod:`fmserve.providers.google_wire`. Streaming: each SSE ``data:`` is a
``GenerateContentResponse`` holding the new parts; the chunk with ``finishReason`` ends
it (a stream without one is a 502). Embeddings: Gemini ``batchEmbedContents``
(https://ai.google.dev/api/embeddings, 100 texts per call, no token counts: estimated as
characters / 4); Vertex ``:predict`` with ``instances: [{"content"}]``
(https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/text-embeddings-api,
250 texts per call, one per call for ``gemini-embedding-*``; ``statistics.token_count``).

Errors: ``{"error": {"code", "message", "status"}}`` bodies keep their message
(:func:`~fmserve.providers.upstream.provider_error`; 429 ``RESOURCE_EXHAUSTED`` → 429); a
failed token exchange is a 401; an answer that does not match ``response_format`` is a 502.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fmserve.backends import EmbeddingResult
from fmserve.errors import BadGateway, FmserveError, Unauthenticated
from fmserve.oauth_tokens import TokenSource
from fmserve.protocol.chat import ChatCompletionRequest
from fmserve.protocol.embeddings import EmbeddingsRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import common
from fmserve.providers import google_wire as wire
from fmserve.providers.base import Body, ExternalBackend, ProviderContext
from fmserve.providers.upstream import sse_events

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
TOKEN_LIFETIME_S = 3600
EMBED_CONCURRENCY = 8  # embedding calls in flight per request


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_jwt(claims: dict[str, Any], key: rsa.RSAPrivateKey, kid: str | None = None) -> str:
    """An RS256 JWT (compact form) of ``claims`` signed with ``key``."""
    header = {"alg": "RS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(sig)}"


class GoogleBackend(ExternalBackend):
    """Shared Gemini chat/stream/embeddings; subclasses give URLs and auth headers."""

    supported_params: ClassVar[frozenset[str]] = frozenset(
        {"top_k", "seed", "presence_penalty", "frequency_penalty", "dimensions",
         "instruction", "user"})

    async def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def url(self, method: str) -> str:
        raise NotImplementedError

    # -- chat ----------------------------------------------------------------------
    async def _body(self, req: ChatCompletionRequest) -> Body:
        self.reject_unsupported(req)
        images = await self.load_images(req)
        return wire.request_body(req, images)

    async def chat(self, req: ChatCompletionRequest) -> Body:
        """A chat completion (``n`` > 1 as concurrent calls).

        Raises:
            InvalidParameterValue: a request Gemini cannot take (see ``google_wire``).
            FmserveError: the provider's error, mapped; 502 for a ``response_format``
                answer that does not validate.
        """
        body = await self._body(req)

        async def once(r: ChatCompletionRequest) -> Body:
            data = await self.upstream.send(self.url("generateContent"), body,
                                            await self.auth_headers())
            answer, usage = wire.from_response(data)
            common.check_structured(answer.text, req)
            return common.chat_answer([answer], usage)

        return await self.chat_n(req, once)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        """``chat.completion.chunk`` dicts from ``:streamGenerateContent?alt=sse``."""
        body = await self._body(req)
        async for chunk in self.upstream.stream(self.url("streamGenerateContent") + "?alt=sse",
                                                body, await self.auth_headers(),
                                                lambda resp: self._chunks(resp, req)):
            yield chunk

    async def _chunks(self, resp: Any, req: ChatCompletionRequest) -> AsyncIterator[Body]:
        w = common.ChunkWriter()
        yield w.start()
        finish: str | None = None
        calls = 0
        async for _, data in sse_events(resp):
            try:
                event = json.loads(data)
            except ValueError:
                raise BadGateway(f"{self.provider} sent a stream event that is not JSON: "
                                 f"{data[:200]!r}") from None
            if isinstance(event, list) and event:
                event = event[0]
            if not isinstance(event, dict):
                continue
            if "error" in event:
                raise BadGateway(f"{self.provider} stream error: "
                                 f"{(event['error'] or {}).get('message', event['error'])}")
            w.prompt_tokens, w.completion_tokens, w.reasoning_tokens = wire.usage_of(event)
            candidates = event.get("candidates") or []
            if not candidates:
                if (event.get("promptFeedback") or {}).get("blockReason"):
                    finish = "content_filter"
                continue
            for p in wire.pieces(candidates[0]):
                if p.kind == "thought":
                    yield w.reasoning_delta(p.text, p.signature)
                elif p.kind == "text":
                    if p.text:
                        yield w.text_delta(p.text)
                    if p.signature:
                        yield w.reasoning_delta("", p.signature)
                else:
                    yield w.tool_start(calls, wire.call_id(p.signature), p.name,
                                       json.dumps(p.args))
                    calls += 1
            raw = candidates[0].get("finishReason")
            if raw:
                finish = wire.finish_reason(raw, calls > 0)
        if finish is None:
            raise BadGateway(f"The stream from {self.provider} ended without a finishReason.")
        common.check_structured(w.text, req)
        yield w.finish(finish)

    # -- embeddings ----------------------------------------------------------------
    batch_size: ClassVar[int] = 100

    async def embed(self, req: EmbeddingsRequest) -> EmbeddingResult:
        """Embeddings in batches (at most :data:`EMBED_CONCURRENCY` calls at once), one
        float32 row per input.

        Raises:
            BadGateway: an answer without one vector (all of one length) per input.
        """
        if not self.capabilities.embeddings:
            raise self._unsupported("Embeddings")
        self.reject_unsupported(req)
        texts = req.texts()
        size = self._batch_size()
        batches = [texts[i:i + size] for i in range(0, len(texts), size)]
        gate = asyncio.Semaphore(EMBED_CONCURRENCY)

        async def one(batch: list[str]) -> tuple[list[list[float]], int]:
            async with gate:
                return await self._embed_batch(batch, req)

        results = await asyncio.gather(*(one(b) for b in batches))
        rows = [r for vectors, _ in results for r in vectors]
        if len(rows) != len(texts) or not rows[0] or len({len(r) for r in rows}) != 1:
            raise BadGateway(f"{self.provider} answered {len(rows)} embeddings of lengths "
                             f"{sorted({len(r) for r in rows})} for {len(texts)} inputs.")
        return EmbeddingResult(np.asarray(rows, dtype=np.float32),
                               sum(tokens for _, tokens in results))

    def _batch_size(self) -> int:
        return self.batch_size

    async def _embed_batch(self, texts: list[str],
                           req: EmbeddingsRequest) -> tuple[list[list[float]], int]:
        raise NotImplementedError


class GeminiBackend(GoogleBackend):
    """``provider: google`` — the Gemini API, API key in ``x-goog-api-key``."""

    provider: ClassVar[str] = "google"

    def check_config(self) -> None:
        self.api_key = self.credential("google_api_key")
        self.base = str(self.option("google_api_base",
                                    "https://generativelanguage.googleapis.com")).rstrip("/")

    async def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": str(self.api_key)}

    def url(self, method: str) -> str:
        return f"{self.base}/v1beta/models/{self.model}:{method}"

    async def _embed_batch(self, texts: list[str],
                           req: EmbeddingsRequest) -> tuple[list[list[float]], int]:
        one: Body = {"model": f"models/{self.model}"}
        if req.dimensions is not None:
            one["outputDimensionality"] = req.dimensions
        body: Body = {"requests": [{**one, "content": {"parts": [{"text": t}]}}
                                   for t in texts]}
        body.update(self.extra_params(req))
        answer = await self.upstream.send(self.url("batchEmbedContents"), body,
                                          await self.auth_headers())
        found = answer.get("embeddings") if isinstance(answer, dict) else None
        vectors = [e.get("values") or [] for e in found or [] if isinstance(e, dict)]
        return vectors, sum(max(1, len(t) // 4) for t in texts)


class VertexBackend(GoogleBackend):
    """``provider: google-cloud-vertex-ai`` — Vertex AI, service-account OAuth token."""

    provider: ClassVar[str] = "google-cloud-vertex-ai"
    batch_size: ClassVar[int] = 250

    def check_config(self) -> None:
        region = self.option("region")
        if not region:
            raise self.config_error("'region' is required (e.g. us-central1)")
        raw = str(self.credential("private_key"))
        try:
            info = json.loads(raw)
            self.client_email = str(info["client_email"])
            key = serialization.load_pem_private_key(str(info["private_key"]).encode(), None)
        except (ValueError, KeyError, TypeError):
            raise self.config_error(
                "'private_key' must be a service-account JSON key (the file from IAM → "
                "Service accounts → Keys) with client_email and an RSA private_key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise self.config_error("the service-account private_key must be an RSA key")
        self._secrets.add(str(info["private_key"]))
        self.signing_key = key
        self.key_id = info.get("private_key_id")
        self.project = self.option("project_id", info.get("project_id"))
        if not self.project:
            raise self.config_error("'project_id' is required")
        self.region = str(region)
        host = ("aiplatform.googleapis.com" if self.region == "global"
                else f"{self.region}-aiplatform.googleapis.com")
        self.base = str(self.option("vertex_ai_api_base", f"https://{host}")).rstrip("/")
        self.token_url = str(self.option("vertex_ai_token_url",
                                         info.get("token_uri") or DEFAULT_TOKEN_URI))
        self.tokens = TokenSource("The Vertex AI token endpoint", self._fetch_token,
                                  on_token=self._secrets.add)

    def url(self, method: str) -> str:
        return (f"{self.base}/v1/projects/{self.project}/locations/{self.region}/publishers/"
                f"google/models/{self.model}:{method}")

    async def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.access_token()}"}

    async def access_token(self) -> str:
        """The cached OAuth access token, fetched again 5 minutes before it expires.

        Raises:
            Unauthenticated: the token endpoint refused the key (401).
        """
        return await self.tokens.token()

    async def _fetch_token(self) -> Any:
        """One JWT bearer grant (see the module docstring): the token endpoint's answer."""
        now = int(time.time())
        assertion = sign_jwt({"iss": self.client_email, "scope": SCOPE, "aud": self.token_url,
                              "iat": now, "exp": now + TOKEN_LIFETIME_S},
                             self.signing_key, self.key_id)
        form = urllib.parse.urlencode({"grant_type": JWT_BEARER, "assertion": assertion})
        try:
            return await self.upstream.send(
                self.token_url, data=form.encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"})
        except FmserveError as exc:
            if exc.status_code in (429, 502, 503, 504):
                raise
            raise Unauthenticated(f"Vertex AI token exchange for {self.client_email} "
                                  f"failed: {exc.message}") from None

    def _batch_size(self) -> int:
        return 1 if self.model.startswith("gemini-embedding") else self.batch_size

    async def _embed_batch(self, texts: list[str],
                           req: EmbeddingsRequest) -> tuple[list[list[float]], int]:
        body: Body = {"instances": [{"content": t} for t in texts]}
        if req.dimensions is not None:
            body["parameters"] = {"outputDimensionality": req.dimensions}
        body.update(self.extra_params(req))
        answer = await self.upstream.send(self.url("predict"), body, await self.auth_headers())
        vectors, tokens = [], 0
        found = answer.get("predictions") if isinstance(answer, dict) else None
        for p in found or []:
            emb = (p.get("embeddings") if isinstance(p, dict) else None) or {}
            vectors.append(emb.get("values") or [])
            tokens += int((emb.get("statistics") or {}).get("token_count") or 0)
        return vectors, tokens


def create(name: str, model: ExternalModelInput, ctx: ProviderContext) -> ExternalBackend:
    """The backend for ``provider`` ``google`` or ``google-cloud-vertex-ai``."""
    cls = VertexBackend if model.provider == "google-cloud-vertex-ai" else GeminiBackend
    return cls(name, model, ctx)
