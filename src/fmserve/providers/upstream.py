"""The one HTTP transport toward upstream providers, and the one place their errors are mapped.

* :class:`HttpClient` — the pooled ``aiohttp`` session every provider shares (made once
  by the app factory, closed at shutdown);
* :class:`Upstream` — one provider's view of it: :meth:`~Upstream.send` (a request, a
  decoded JSON answer) and :meth:`~Upstream.stream` (a request, then the chunks a
  parser reads from the open response), with two hooks: ``sign`` (headers computed over
  the exact bytes and URL sent, e.g. AWS SigV4) and ``error`` (an error answer → an
  fmserve error, e.g. Bedrock's ``x-amzn-ErrorType``). A provider backend receives its
  upstream from :class:`~fmserve.providers.base.ProviderContext`, so tests can hand it
  another one;
* :func:`map_upstream_errors` — the context manager (in the manner of httpx's
  ``map_httpcore_exceptions``) that turns what a call raises into fmserve's errors:
  provider HTTP errors through :func:`provider_error` (4xx → 400, 401/403 kept, 429 →
  429 with ``Retry-After``, 5xx → 502/503), timeouts → 504 ``DEADLINE_EXCEEDED``,
  connection failures → 502; every message scrubbed of the provider's credentials; a
  stream that breaks mid-way raises the same errors, which the HTTP layer sends as a
  final error event;
* :func:`sse_events` — ``text/event-stream`` parsing.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

import aiohttp
import orjson
import yarl

from fmserve.errors import (
    BadGateway,
    BadRequest,
    DeadlineExceeded,
    FmserveError,
    PermissionDenied,
    RequestLimitExceeded,
    TemporarilyUnavailable,
    Unauthenticated,
)

Body = dict[str, Any]
# (method, url, body bytes, headers) → the headers to send (the request goes out exactly
# as signed: the URL is not re-encoded).
Signer = Callable[[str, str, bytes, dict[str, str]], dict[str, str]]
# (status, body, headers) of an error answer → the fmserve error to raise.
ErrorMapper = Callable[[int, bytes, Any], FmserveError]
# What a stream parser is: the open response → fmserve chunks.
Parser = Callable[[aiohttp.ClientResponse], AsyncIterator[Body]]


def _env_configured() -> bool:
    """Whether aiohttp's ``trust_env`` has anything to read: a proxy variable or a netrc file.

    With ``trust_env`` aiohttp looks up ``~/.netrc`` and the proxy variables on every
    request, each in a thread-pool hop (about 0.25 ms of CPU a request, a third of the
    gateway's own cost), so it is on only when they exist (checked once, at session start).
    """
    if any(k != "no" for k in urllib.request.getproxies_environment()):
        return True
    return os.path.exists(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))


KEEPALIVE_S = 4.0  # s, idle upstream connections kept


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
                # Idle connections are dropped after 4 s, before uvicorn-style upstreams
                # (a self-hosted vLLM: 5 s) close theirs: reusing one they are closing
                # fails a POST that cannot safely be retried.
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300,
                                               keepalive_timeout=KEEPALIVE_S),
                json_serialize=lambda o: orjson.dumps(o).decode(), auto_decompress=True,
                trust_env=_env_configured())
        return self._session

    async def close(self) -> None:
        for s in [self._session, *self._image_sessions.values()]:
            if s is not None:
                await s.close()


# -- provider error answers ------------------------------------------------------------------
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
    """The Databricks error for a provider's HTTP error answer (message kept): 429 →
    :class:`RequestLimitExceeded` (``Retry-After`` from the headers or a Google
    ``RetryInfo``), 401/403 kept, 503/529 → :class:`TemporarilyUnavailable`, 504 →
    :class:`DeadlineExceeded`, other 5xx → :class:`BadGateway`, other 4xx → 400."""
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
    return BadRequest(msg)


def _same(text: str) -> str:
    return text


@contextmanager
def map_upstream_errors(provider: str, timeout_s: float,
                        scrub: Callable[[str], str] = _same, *,
                        midstream: bool = False) -> Iterator[None]:
    """Map what a call to ``provider`` raises onto fmserve's errors (the one place).

    An :class:`~fmserve.errors.FmserveError` passes with its message scrubbed; a timeout
    becomes :class:`DeadlineExceeded` (504, "did not answer within ``timeout_s`` s"); any
    other exception becomes :class:`BadGateway` (502, "connection failed"). With
    ``midstream`` (an open stream being read) only transport failures (timeouts,
    ``aiohttp.ClientError``) are mapped, their message prefixed "The stream from … broke";
    other exceptions pass unchanged. Cancellation always passes.
    """
    try:
        yield
    except FmserveError as exc:
        exc.message = scrub(exc.message)
        raise
    except Exception as exc:
        transport = isinstance(exc, TimeoutError | aiohttp.ClientError)
        if midstream and not transport:
            raise
        timeout = isinstance(exc, TimeoutError)  # aiohttp.ServerTimeoutError included
        msg = (f"{provider} did not answer within {timeout_s:g} s." if timeout else
               scrub(f"{provider} connection failed: {type(exc).__name__}: {exc}"))
        if midstream:
            msg = f"The stream from {provider} broke: {msg}"
        raise (DeadlineExceeded if timeout else BadGateway)(msg) from None


class Reply(NamedTuple):
    """A provider's answer: its decoded JSON body and its response headers."""

    data: Any
    headers: Mapping[str, str]


class Upstream:
    """One provider's HTTP calls on the shared :class:`HttpClient`.

    Args:
        http: the shared client (its session and timeout).
        provider: the name errors carry (``"openai"``, ``"Microsoft Entra ID"``, …).
        scrub: removes credentials from every error message.
        sign: the signing hook (:data:`Signer`); a signed request's URL is sent as given.
        error: maps an error answer (:data:`ErrorMapper`); default :func:`provider_error`.
    """

    def __init__(self, http: HttpClient, provider: str, *,
                 scrub: Callable[[str], str] = _same, sign: Signer | None = None,
                 error: ErrorMapper | None = None) -> None:
        self.http = http
        self.provider = provider
        self.scrub = scrub
        self.sign = sign
        self.error: ErrorMapper = error or functools.partial(provider_error, provider)

    def errors(self, *, midstream: bool = False) -> AbstractContextManager[None]:
        """:func:`map_upstream_errors` for this provider (a context manager)."""
        return map_upstream_errors(self.provider, self.http.timeout_s, self.scrub,
                                   midstream=midstream)

    def _request(self, method: str, url: str, body: Any, headers: dict[str, str] | None,
                 data: bytes | None) -> tuple[str | yarl.URL, bytes | None, dict[str, str]]:
        payload = data if data is not None else (orjson.dumps(body) if body is not None
                                                 else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.sign is None:
            return url, payload, hdrs
        return (yarl.URL(url, encoded=True), payload,
                self.sign(method, url, payload or b"", hdrs))

    async def send(self, url: str, body: Any = None, headers: dict[str, str] | None = None,
                   *, data: bytes | None = None, method: str = "POST") -> Any:
        """Send ``body`` as JSON (or ``data`` as is) and return the decoded JSON answer.

        Raises:
            FmserveError: the mapped error answer (the ``error`` hook), 504 on timeout,
                502 on connection failure or a body that is not JSON.
        """
        return (await self.send_reply(url, body, headers, data=data, method=method)).data

    async def send_reply(self, url: str, body: Any = None,
                         headers: dict[str, str] | None = None, *, data: bytes | None = None,
                         method: str = "POST") -> Reply:
        """As :meth:`send`, with the answer's headers."""
        target, payload, hdrs = self._request(method, url, body, headers, data)
        with self.errors():
            async with self.http.session().request(method, target, data=payload,
                                                   headers=hdrs) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self.error(resp.status, raw, resp.headers)
        try:
            return Reply(orjson.loads(raw), resp.headers)
        except orjson.JSONDecodeError:
            raise BadGateway(f"{self.provider} answered with a body that is not JSON: "
                             f"{self.scrub(raw[:200].decode('utf-8', 'replace'))}") from None

    async def stream(self, url: str, body: Any, headers: dict[str, str] | None,
                     parse: Parser) -> AsyncIterator[Body]:
        """POST ``body`` and yield what ``parse`` reads from the open response.

        The response is released when the stream ends, fails or is closed.

        Raises:
            FmserveError: as :meth:`send` before the first chunk; after it, what ``parse``
                raises and broken connections, mapped (``midstream``).
        """
        target, payload, hdrs = self._request("POST", url, body, headers, None)
        with self.errors():
            resp = await self.http.session().post(target, data=payload, headers=hdrs)
            if resp.status >= 400:
                raw = await resp.read()
                resp.release()
                raise self.error(resp.status, raw, resp.headers)
        try:
            with self.errors(midstream=True):
                async for chunk in parse(resp):
                    yield chunk
        finally:
            resp.release()


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
