"""fmserve's own HTTP client: the CLI, SQL functions, batch inference, benchmarks and
tests talk to a server (this one or a Databricks workspace) through it.

* **Auth.** ``host``/``token`` given, else ``DATABRICKS_HOST`` / ``DATABRICKS_TOKEN``
  (the Databricks unified-auth variables), else the local server
  ``http://127.0.0.1:8080``. The token is sent as ``Authorization: Bearer <token>``.
* **Errors.** A status ≥ 400 raises :class:`ApiError` with the Databricks error shape
  (``{"error_code", "message"}``, spec §3); a transport failure raises
  :class:`ApiUnreachable`.
* **Retries.** 429 and 503 are retried up to ``max_retries`` times, waiting what
  ``Retry-After`` says (seconds or an HTTP date; 1 s when absent, at most
  ``max_wait_s``) — as the OpenAI and Databricks SDKs do. Those statuses mean the
  request was not run (admission control, a restarting worker), so POSTs are retried too.
* **Concurrency.** :class:`AsyncClient` runs at most ``max_concurrency`` requests at once
  (an ``asyncio.Semaphore``); extra calls wait their turn.

``.http`` is the underlying ``httpx`` client (base URL and auth set) for callers that
need raw responses (status codes, headers, streams).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

LOCAL_HOST = "http://127.0.0.1:8080"
RETRY_STATUSES = frozenset({429, 503})


class ApiError(Exception):
    """An error answer. Attributes: ``status`` (HTTP), ``error_code``, ``message``."""

    def __init__(self, status: int, error_code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {error_code}: {message}")
        self.status, self.error_code, self.message = status, error_code, message

    @classmethod
    def of(cls, r: httpx.Response) -> ApiError:
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error_code" in body:
            return cls(r.status_code, str(body["error_code"]), str(body.get("message", "")))
        if isinstance(body, dict) and "detail" in body:  # SCIM (RFC 7644 §3.12)
            code = "SCIM_" + str(body.get("scimType") or body.get("status") or r.status_code)
            return cls(r.status_code, code, str(body["detail"]))
        if isinstance(body, dict) and isinstance(body.get("error"), str):  # OAuth (RFC 6749)
            return cls(r.status_code, body["error"], str(body.get("error_description", "")))
        return cls(r.status_code, "HTTP_ERROR", r.text[:500])


class ApiUnreachable(Exception):
    """The server could not be reached (connection refused, timeout, ...)."""


def resolve(host: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """``(host, token)``: the arguments, else the environment, else the local server."""
    host = host or os.environ.get("DATABRICKS_HOST") or LOCAL_HOST
    if "://" not in host:
        host = f"https://{host}"  # DATABRICKS_HOST is often a bare workspace name
    return host.rstrip("/"), token or os.environ.get("DATABRICKS_TOKEN") or None


def http_client(host: str | None = None, token: str | None = None, timeout: float = 300,
                **kw: Any) -> httpx.Client:
    """A raw ``httpx.Client`` for ``host`` with the bearer token set."""
    base, tok = resolve(host, token)
    return httpx.Client(base_url=base, timeout=timeout, headers=_auth(tok), **kw)


def async_http_client(host: str | None = None, token: str | None = None,
                      timeout: float = 300, connections: int | None = None,
                      **kw: Any) -> httpx.AsyncClient:
    """A raw ``httpx.AsyncClient`` for ``host`` with the bearer token set; ``connections``
    bounds the pool (default: httpx's)."""
    base, tok = resolve(host, token)
    if connections is not None:
        kw["limits"] = httpx.Limits(max_connections=connections,
                                    max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base, timeout=timeout, headers=_auth(tok), **kw)


def retry_after_s(r: httpx.Response, max_wait_s: float) -> float:
    """Seconds ``Retry-After`` asks for (delta-seconds or HTTP-date), 1 when absent,
    clamped to ``[0, max_wait_s]``."""
    value = r.headers.get("retry-after")
    wait = 1.0
    if value:
        try:
            wait = float(value)
        except ValueError:
            try:
                wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = 1.0
    return max(0.0, min(wait, max_wait_s))


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _result(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise ApiError.of(r)
    return r.json() if r.content else None


@contextmanager
def _transport(base: Any) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as exc:
        raise ApiUnreachable(f"Cannot reach {base}: {exc}") from exc


class Client:
    """Synchronous client. ``request`` returns the parsed JSON body.

    Raises (every method): :class:`ApiError`, :class:`ApiUnreachable`.
    """

    def __init__(self, host: str | None = None, token: str | None = None, *,
                 timeout: float = 300, max_retries: int = 3, max_wait_s: float = 60,
                 **httpx_kw: Any) -> None:
        self.host, self.token = resolve(host, token)
        self.max_retries, self.max_wait_s = max_retries, max_wait_s
        self.http = httpx.Client(base_url=self.host, timeout=timeout, headers=_auth(self.token),
                                 **httpx_kw)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The raw response, after retrying 429/503 (see module doc)."""
        with _transport(self.host):
            for attempt in range(self.max_retries + 1):
                r = self.http.request(method, path, **kw)
                if r.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    return r
                time.sleep(retry_after_s(r, self.max_wait_s))
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return _result(self.send(method, path, **kw))

    # -- the REST API ------------------------------------------------------------
    def list_endpoints(self) -> list[dict[str, Any]]:
        """``GET /api/2.0/serving-endpoints`` → the ``endpoints`` list."""
        return list(self.request("GET", "/api/2.0/serving-endpoints").get("endpoints", []))

    def get_endpoint(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/2.0/serving-endpoints/{name}"))

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("POST", "/api/2.0/serving-endpoints", json=body))

    def update_config(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/api/2.0/serving-endpoints/{name}/config",
                                 json=body))

    def delete_endpoint(self, name: str) -> None:
        self.request("DELETE", f"/api/2.0/serving-endpoints/{name}")

    def query(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /serving-endpoints/{name}/invocations`` (chat, completions or embeddings
        by the body's keys)."""
        return dict(self.request("POST", f"/serving-endpoints/{name}/invocations", json=body))


class AsyncClient:
    """Asynchronous client with bounded concurrency; methods as :class:`Client`."""

    def __init__(self, host: str | None = None, token: str | None = None, *,
                 timeout: float = 300, max_retries: int = 3, max_wait_s: float = 60,
                 max_concurrency: int = 8, **httpx_kw: Any) -> None:
        self.host, self.token = resolve(host, token)
        self.max_retries, self.max_wait_s = max_retries, max_wait_s
        self._slots = asyncio.Semaphore(max_concurrency)
        limits = httpx.Limits(max_connections=max_concurrency,
                              max_keepalive_connections=max_concurrency)
        self.http = httpx.AsyncClient(base_url=self.host, timeout=timeout,
                                      headers=_auth(self.token), limits=limits, **httpx_kw)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """The raw response, after retrying 429/503; waits for a free slot first (the
        slot is released while waiting out ``Retry-After``)."""
        with _transport(self.host):
            for attempt in range(self.max_retries + 1):
                async with self._slots:
                    r = await self.http.request(method, path, **kw)
                if r.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    return r
                await asyncio.sleep(retry_after_s(r, self.max_wait_s))
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        return _result(await self.send(method, path, **kw))

    async def query(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`Client.query`."""
        return dict(await self.request("POST", f"/serving-endpoints/{name}/invocations",
                                       json=body))
