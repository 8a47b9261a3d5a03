"""What every external-model backend shares: configuration, credentials, request checks.

A provider module subclasses :class:`ExternalBackend` and implements the request and
response translation for its API; this module does the rest:

* credentials read from the ``<provider>_config`` object, each field either a
  ``{{secrets/scope/key}}`` reference or a ``*_plaintext`` value stored encrypted
  (:meth:`ExternalBackend.credential`), re-read when a referenced secret changes
  (:meth:`ExternalBackend.before_request`) and scrubbed from every error message;
* HTTP through :attr:`ExternalBackend.upstream`, an
  :class:`~fmserve.providers.upstream.Upstream` built by the :class:`ProviderContext`
  (one pooled session, errors mapped in one place — see ``providers.upstream``);
* request parameters a provider cannot honour → 400 (:meth:`ExternalBackend.reject_unsupported`),
  ``extra_params`` passed through (:meth:`ExternalBackend.extra_params`);
* image inputs loaded once (:meth:`ExternalBackend.load_images`);
* ``n`` > 1 for providers without native ``n`` (concurrent calls), completions on
  chat-only providers (each prompt one user turn); the answers are assembled by
  ``providers.over_chat``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fmserve.backends import Backend, Capabilities
from fmserve.errors import InvalidParameterValue
from fmserve.protocol.chat import ChatCompletionRequest, CompletionRequest
from fmserve.protocol.management import ExternalModelInput
from fmserve.providers import over_chat
from fmserve.providers.upstream import Body, HttpClient, Upstream

if TYPE_CHECKING:
    from fmserve.providers.images import Images

__all__ = ["Body", "ExternalBackend", "HttpClient", "ProviderContext"]

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
        upstream: builds each backend's upstream, called as ``upstream(http, provider,
            scrub=, sign=, error=)`` (default :class:`Upstream`; a test may hand in an
            in-process one).
    """

    http: HttpClient
    secret: Callable[[str], str] = lambda v: v
    allow_private_image_urls: bool = False
    upstream: Callable[..., Upstream] = Upstream


class ExternalBackend(Backend):
    """Base of every provider backend.

    Subclasses set :attr:`provider` and :attr:`supported_params` (request fields beyond
    :data:`_ALWAYS` they honour), implement :meth:`check_config` and the kinds they
    serve (``chat``/``chat_stream``/``complete``/``complete_stream``/``embed``), and
    call :attr:`upstream` (``send`` / ``stream``) for HTTP.
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
        self.upstream = self.connect(**self.upstream_hooks())
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
        return self.secret(str(value))

    def secret(self, value: str) -> str:
        """``value`` resolved (see :attr:`ProviderContext.secret`) and scrubbed from errors."""
        resolved = self.ctx.secret(value)
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

    # -- the upstream --------------------------------------------------------------
    def upstream_hooks(self) -> dict[str, Any]:
        """``sign`` / ``error`` hooks for :attr:`upstream` (see ``providers.upstream``)."""
        return {}

    def connect(self, provider: str | None = None, **hooks: Any) -> Upstream:
        """An upstream for this backend's calls; ``provider`` names another service
        (e.g. a token endpoint) in its errors. Messages are scrubbed of credentials."""
        return self.ctx.upstream(self.ctx.http, provider or self.provider, scrub=self.scrub,
                                 **hooks)

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

    async def load_images(self, req: ChatCompletionRequest) -> Images:
        """The request's images, validated (``providers.images``); a small-image warning
        goes into ``req.response_headers``, which the serving layer sends.

        Raises:
            InvalidParameterValue: an image the limits refuse, or a failed fetch.
        """
        from fmserve.providers.images import prepare_images  # PIL only when needed

        images = await prepare_images(req, self.ctx.http, self.ctx.allow_private_image_urls)
        req.response_headers.update(images.headers())
        return images

    # -- n and completions over chat -------------------------------------------------
    async def chat_n(self, req: ChatCompletionRequest,
                     once: Callable[[ChatCompletionRequest], Awaitable[Body]]) -> Body:
        """``n`` choices by ``n`` concurrent single calls (providers without native ``n``)."""
        if req.n == 1 or self.native_n:
            return await once(req)
        single = req.model_copy(update={"n": 1})
        return over_chat.merge_choices(
            list(await asyncio.gather(*(once(single) for _ in range(req.n)))))

    async def complete(self, req: CompletionRequest) -> Body:
        """Completions on a chat model: each prompt becomes one user turn (``n`` per prompt)."""
        if not self.capabilities.completions:
            raise self._unsupported("Completions")
        answers = await asyncio.gather(*(self.chat(over_chat.as_chat(req, p))
                                         for p in req.prompts()))
        return over_chat.completion_of(list(answers))

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[Body]:
        """Streams a chat answer as completion chunks (one prompt, ``n`` = 1)."""
        if not self.capabilities.completions:
            raise self._unsupported("Completions")
        prompts = req.prompts()
        if len(prompts) != 1 or req.n != 1:
            raise InvalidParameterValue("Streaming completions from an external chat model "
                                        "take one prompt and n = 1.")
        stream = self.chat_stream(over_chat.as_chat(req, prompts[0]))
        try:
            async for chunk in stream:
                yield over_chat.completion_chunk(chunk)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
