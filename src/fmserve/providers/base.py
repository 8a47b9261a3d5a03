"""What every external-model backend shares: HTTP, credentials, provider errors, SSE.

A provider module subclasses :class:`ExternalBackend` and implements the request and
response translation for its API; this module does the rest:

* one pooled ``aiohttp`` session for all providers (:class:`HttpClient`);
* credentials read from the ``<provider>_config`` object, each field either a
  ``{{secrets/scope/key}}`` reference or a ``*_plaintext`` value stored encrypted
  (:meth:`ExternalBackend.credential`), scrubbed from every error message;
* provider HTTP errors mapped onto the Databricks error shape keeping the provider's
  message (:func:`provider_error`): 4xx → 400 (401/403 kept), 429 → 429 with
  ``Retry-After``, 5xx → 502/503, timeouts → 504 ``DEADLINE_EXCEEDED``, connection
  failures → 502; a stream that breaks mid-way raises the same errors, which the HTTP
  layer sends as a final error event;
* ``text/event-stream`` parsing (:func:`sse_events`);
* request parameters a provider cannot honour → 400 (:meth:`ExternalBackend.reject_unsupported`),
  ``extra_params`` passed through (:meth:`ExternalBackend.extra_params`);
* ``n`` > 1 for providers without native ``n`` (concurrent calls), completions on
  chat-only providers (:meth:`ExternalBackend.complete` maps a prompt onto one user turn).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson

from fmserve.backends import Backend, Capabilities
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
from fmserve.protocol.chat import ChatCompletionRequest, ChatMessage, CompletionRequest
from fmserve.protocol.management import ExternalModelInput

log = logging.getLogger("fmserve.providers")

Body = dict[str, Any]

# Request fields every provider handles (or that only concern fmserve).
_ALWAYS = frozenset({
    "model", "messages", "prompt", "input", "stream", "stream_options", "extra_params",
    "client_request_id", "usage_context", "n", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "stop", "tools", "tool_choice", "response_format", "thinking",
    "reasoning_effort", "encoding_format", "parallel_tool_calls",
})


CREDENTIAL_RECHECK_S = 1.0


def _secret_refs(obj: Any) -> list[str]:
    """Every string in a provider config that holds a ``{{secrets/…}}`` reference."""
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in _secret_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _secret_refs(v)]
    return [obj] if isinstance(obj, str) and "{{" in obj and "secrets/" in obj else []


def _env_configured() -> bool:
    """Whether aiohttp's ``trust_env`` has anything to read: a proxy variable or a netrc file.

    With ``trust_env`` aiohttp looks up ``~/.netrc`` and the proxy variables on every
    request, each in a thread-pool hop (about 0.25 ms of CPU a request, a third of the
    gateway's own cost), so it is on only when they exist (checked once, at session start).
    """
    if any(k != "no" for k in urllib.request.getproxies_environment()):
        return True
    return os.path.exists(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))


class HttpClient:
    """The pooled ``aiohttp`` session all providers share (created on first use).

    ``timeout_s`` bounds connecting and each read from the provider (seconds); a
    provider that stays silent longer is a 504.
    """

    def __init__(self, timeout_s: float = 600.0) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._image_sessions: dict[bool, aiohttp.ClientSession] = {}

    def image_session(self, allow_private: bool,
                      factory: Callable[[bool], aiohttp.ClientSession]) -> aiohttp.ClientSession:
        """The session for fetching image URLs (see ``providers.images``), made once."""
        s = self._image_sessions.get(allow_private)
        if s is None or s.closed:
            s = self._image_sessions[allow_private] = factory(allow_private)
        return s

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=min(10.0, self.timeout_s),
                                              sock_read=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                json_serialize=lambda o: orjson.dumps(o).decode(), auto_decompress=True,
                trust_env=_env_configured())
        return self._session

    async def close(self) -> None:
        for s in [self._session, *self._image_sessions.values()]:
            if s is not None:
                await s.close()


@dataclass
class ProviderContext:
    """What a provider backend needs from the server.

    Attributes:
        http: the shared HTTP client.
        secret: resolves one stored credential value (a ``{{secrets/scope/key}}``
            reference, an encrypted ``*_plaintext`` value, or a literal) to its text;
            raises :class:`~fmserve.errors.InvalidParameterValue` for an unknown secret.
        allow_private_image_urls: let ``image_url`` fetches reach private, loopback
            and link-local addresses (off: no SSRF through the gateway).
    """

    http: HttpClient
    secret: Callable[[str], str] = lambda v: v
    allow_private_image_urls: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _retry_after(headers: Any, default: int = 1) -> int:
    for name in ("retry-after", "x-ratelimit-reset-requests", "retry-after-ms"):
        value = headers.get(name) if headers is not None else None
        if not value:
            continue
        try:
            seconds = float(str(value).rstrip("s"))
        except ValueError:
            continue
        if name == "retry-after-ms":
            seconds /= 1000
        return max(1, int(seconds + 0.999))
    return default


def _retry_delay(body: bytes | str) -> int | None:
    """Seconds of a Google ``RetryInfo`` error detail (``"retryDelay": "37s"``), if any."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return None
    data = data[0] if isinstance(data, list) and data else data
    err = data.get("error") if isinstance(data, dict) else None
    for d in (err.get("details") or []) if isinstance(err, dict) else []:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("google.rpc.RetryInfo"):
            try:
                return max(1, int(float(str(d.get("retryDelay")).rstrip("s")) + 0.999))
            except ValueError:
                return None
    return None


def provider_message(body: bytes | str) -> str:
    """The human message inside a provider's error body (OpenAI, Anthropic, Google,
    Bedrock, Cohere and Databricks shapes), else the body text (truncated to 1000 chars)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:1000]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # Vertex/Gemini sometimes wrap the error in a list
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):  # OAuth 2.0 token endpoints (RFC 6749 §5.2)
            desc = data.get("error_description")
            return f"{err}: {desc}" if isinstance(desc, str) and desc else err
        for key in ("message", "Message", "detail"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return text.strip()[:1000]


def provider_error(provider: str, status: int, body: bytes | str,
                   headers: Any = None) -> FmserveError:
    """The Databricks error for a provider's HTTP error answer (message kept)."""
    msg = f"{provider} returned HTTP {status}: {provider_message(body)}"
    if status == 429:
        return RequestLimitExceeded(msg, retry_after=_retry_after(headers,
                                                                  _retry_delay(body) or 1))
    if status == 401:
        return Unauthenticated(msg)
    if status == 403:
        return PermissionDenied(msg)
    if status in (503, 529):  # 529: Anthropic "overloaded_error"
        return TemporarilyUnavailable(msg, retry_after=_retry_after(headers, 5))
    if status == 504:
        return DeadlineExceeded(msg)
    if status >= 500:
        return BadGateway(msg)
    if status == 413:
        return BadRequest(msg)
    return BadRequest(msg)


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` pairs of a ``text/event-stream`` body (event ``""`` when unnamed).

    Multi-line ``data:`` fields are joined with ``\\n``; comments are skipped.
    """
    event: str = ""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


class ExternalBackend(Backend):
    """Base of every provider backend.

    Subclasses set :attr:`provider` and :attr:`supported_params` (request fields beyond
    :data:`_ALWAYS` they honour), implement :meth:`check_config` and the kinds they
    serve (``chat``/``chat_stream``/``complete``/``complete_stream``/``embed``), and
    call :meth:`post_json` / :meth:`open_stream` for HTTP.
    """

    provider: ClassVar[str] = ""
    supported_params: ClassVar[frozenset[str]] = frozenset()
    native_n: ClassVar[bool] = False
    chat_features: ClassVar[Capabilities] = Capabilities(tools=True, json_schema=True,
                                                         vision=True, reasoning=True)

    def __init__(self, name: str, model: ExternalModelInput, ctx: ProviderContext) -> None:
        self.name = name
        self.model = model.name
        self.task = model.task
        self.config = model.provider_config()
        self.ctx = ctx
        self._secrets: set[str] = set()
        chat = model.task == "llm/v1/chat"
        f = self.chat_features
        self.capabilities = Capabilities(
            chat=chat, completions=model.task in ("llm/v1/chat", "llm/v1/completions"),
            embeddings=model.task == "llm/v1/embeddings",
            tools=chat and f.tools, json_schema=chat and f.json_schema,
            vision=chat and f.vision, reasoning=chat and f.reasoning)
        self.check_config()
        self._refs = _secret_refs(self.config)
        self._ref_values = tuple(self.ctx.secret(r) for r in self._refs)
        self._refs_checked = time.monotonic()

    # -- configuration -----------------------------------------------------------
    def check_config(self) -> None:
        """Validate ``self.config``; raise InvalidParameterValue (400) on a bad config."""

    def before_request(self) -> None:
        """Every ``CREDENTIAL_RECHECK_S``: if a referenced secret changed (``fmserve secrets
        put``), rebuild the credentials (``check_config`` again). A deleted secret → 400."""
        if not self._refs or time.monotonic() - self._refs_checked < CREDENTIAL_RECHECK_S:
            return
        self._refs_checked = time.monotonic()
        values = tuple(self.ctx.secret(r) for r in self._refs)
        if values != self._ref_values:
            self._ref_values = values
            self.check_config()

    def config_error(self, message: str) -> InvalidParameterValue:
        return InvalidParameterValue(f"served entity '{self.name}' ({self.provider}): {message}")

    def credential(self, field: str, required: bool = True) -> str | None:
        """The value of ``field`` or ``field_plaintext`` in the provider config, resolved.

        Raises:
            InvalidParameterValue: neither is set (when ``required``) or both are, or a
                referenced secret does not exist.
        """
        ref, plain = self.config.get(field), self.config.get(f"{field}_plaintext")
        if ref and plain:
            raise self.config_error(f"set only one of '{field}' and '{field}_plaintext'")
        value = ref or plain
        if not value:
            if required:
                raise self.config_error(f"'{field}' (a {{{{secrets/scope/key}}}} reference) or "
                                        f"'{field}_plaintext' is required")
            return None
        resolved = self.ctx.secret(str(value))
        self._secrets.add(resolved)
        return resolved

    def option(self, name: str, default: Any = None) -> Any:
        value = self.config.get(name)
        return default if value in (None, "") else value

    def scrub(self, text: str) -> str:
        """``text`` with every credential this backend resolved replaced by ``[REDACTED]``."""
        for s in self._secrets:
            if s and len(s) >= 4:
                text = text.replace(s, "[REDACTED]")
        return text

    # -- request checks --------------------------------------------------------------
    def reject_unsupported(self, req: Any) -> None:
        """400 for request fields this provider cannot honour (never a silent drop)."""
        given = set(req.model_fields_set) | set(req.model_extra or {})
        bad = sorted(f for f in given - _ALWAYS - self.supported_params
                     if getattr(req, f, None) is not None or f in (req.model_extra or {}))
        if bad:
            raise InvalidParameterValue(
                f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not supported by "
                f"served entity '{self.name}' (provider {self.provider}); pass "
                f"provider-specific parameters in extra_params.")

    @staticmethod
    def extra_params(req: Any) -> dict[str, Any]:
        """``extra_params`` to merge verbatim into the provider's request body."""
        return dict(req.extra_params or {})

    # -- HTTP ----------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> FmserveError:
        if isinstance(exc, FmserveError):
            exc.message = self.scrub(exc.message)
            return exc
        if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
            return DeadlineExceeded(f"{self.provider} did not answer within "
                                    f"{self.ctx.http.timeout_s:g} s.")
        return BadGateway(self.scrub(f"{self.provider} connection failed: "
                                     f"{type(exc).__name__}: {exc}"))

    async def post_json(self, url: str, body: Any = None, headers: dict[str, str] | None = None,
                        *, data: bytes | None = None, method: str = "POST") -> Any:
        """Send a request and return the decoded JSON answer.

        Raises:
            FmserveError: mapped provider error (:func:`provider_error`), 504 on timeout,
                502 on connection failure or a non-JSON answer.
        """
        payload = data if data is not None else (orjson.dumps(body) if body is not None
                                                 else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        try:
            async with self.ctx.http.session().request(method, url, data=payload,
                                                       headers=hdrs) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise provider_error(self.provider, resp.status, raw, resp.headers)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._fail(exc) from None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadGateway(f"{self.provider} answered with a body that is not JSON: "
                             f"{self.scrub(raw[:200].decode('utf-8', 'replace'))}") from None

    async def open_stream(self, url: str, body: Any = None,
                          headers: dict[str, str] | None = None, *,
                          data: bytes | None = None) -> aiohttp.ClientResponse:
        """POST and return the open streaming response (caller must ``release()`` it).

        Raises:
            FmserveError: as :meth:`post_json`, for an error status before the stream.
        """
        payload = data if data is not None else orjson.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        try:
            resp = await self.ctx.http.session().post(url, data=payload, headers=hdrs)
            if resp.status >= 400:
                raw = await resp.read()
                resp.release()
                raise provider_error(self.provider, resp.status, raw, resp.headers)
            return resp
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._fail(exc) from None

    async def guard_stream(self, chunks: AsyncIterator[Body],
                           resp: aiohttp.ClientResponse) -> AsyncIterator[Body]:
        """Re-raise transport failures inside ``chunks`` as mapped errors; always release."""
        try:
            async for chunk in chunks:
                yield chunk
        except (TimeoutError, aiohttp.ClientError, FmserveError) as exc:
            err = self._fail(exc)
            if not isinstance(exc, FmserveError):
                err.message = f"The stream from {self.provider} broke: {err.message}"
            raise err from None
        finally:
            resp.release()

    # -- generic n / completions -----------------------------------------------------
    async def chat_n(self, req: ChatCompletionRequest,
                     once: Callable[[ChatCompletionRequest], Any]) -> Body:
        """``n`` choices by ``n`` concurrent single calls (providers without native ``n``)."""
        if req.n == 1 or self.native_n:
            return await once(req)  # type: ignore[no-any-return]
        single = req.model_copy(update={"n": 1})
        answers = await asyncio.gather(*(once(single) for _ in range(req.n)))
        choices = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        usage: dict[str, int] = {}
        for a in answers:
            for k, v in (a.get("usage") or {}).items():
                if isinstance(v, int):
                    usage[k] = usage.get(k, 0) + v
        # The prompt is the same for every call: count it once.
        if "prompt_tokens" in usage:
            usage["prompt_tokens"] //= req.n
            usage["total_tokens"] = usage["prompt_tokens"] + usage.get("completion_tokens", 0)
        return {"object": "chat.completion", "choices": choices, "usage": usage}

    def _as_chat(self, req: CompletionRequest, prompt: str) -> ChatCompletionRequest:
        fields = req.model_dump(exclude={"prompt"}, exclude_none=True)
        fields["messages"] = [ChatMessage(role="user", content=prompt)]
        return ChatCompletionRequest.model_validate(fields)

    async def complete(self, req: CompletionRequest) -> Body:
        """Completions on a chat model: each prompt becomes one user turn (``n`` per prompt)."""
        if not self.capabilities.completions:
            raise self._unsupported("Completions")
        answers = await asyncio.gather(*(self.chat(self._as_chat(req, p))
                                         for p in req.prompts()))
        choices: list[Body] = []
        prompt_t = completion_t = 0
        for a in answers:
            for c in a["choices"]:
                content = c["message"].get("content")
                text = content if isinstance(content, str) else "".join(
                    b.get("text", "") for b in content or [] if b.get("type") == "text")
                choices.append({"index": len(choices), "text": text,
                                "finish_reason": c.get("finish_reason"), "logprobs": None})
            u = a.get("usage") or {}
            prompt_t += u.get("prompt_tokens", 0)
            completion_t += u.get("completion_tokens", 0)
        return {"object": "text_completion", "choices": choices,
                "usage": {"prompt_tokens": prompt_t, "completion_tokens": completion_t,
                          "total_tokens": prompt_t + completion_t}}

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[Body]:
        """Streams a chat answer as completion chunks (one prompt, ``n`` = 1)."""
        if not self.capabilities.completions:
            raise self._unsupported("Completions")
        prompts = req.prompts()
        if len(prompts) != 1 or req.n != 1:
            raise InvalidParameterValue("Streaming completions from an external chat model "
                                        "take one prompt and n = 1.")
        stream = self.chat_stream(self._as_chat(req, prompts[0]))
        try:
            async for chunk in stream:
                out = []
                for c in chunk.get("choices", []):
                    d = c.get("delta") or {}
                    text = d.get("content") if isinstance(d.get("content"), str) else ""
                    out.append({"index": c.get("index", 0), "text": text or "",
                                "finish_reason": c.get("finish_reason"), "logprobs": None})
                yield {"object": "text_completion", "choices": out, "usage": chunk.get("usage")}
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
