"""Cached OAuth 2.0 access tokens: one :class:`TokenSource` for every token fmserve fetches.

A token source wraps a token request (client credentials, a JWT bearer grant, …) made by
its owner; it keeps the answer's ``access_token`` until shortly before ``expires_in``
runs out and makes concurrent callers share one request. It knows no HTTP client and no
provider, so the provider backends (Microsoft Entra ID, Google service accounts) and
fmserve's own OAuth clients can all use it; it lives at the top of the package because
``gateway/`` must not import ``providers/``.

Token answers follow RFC 6749 §5.1 (https://www.rfc-editor.org/rfc/rfc6749#section-5.1):
``{"access_token", "token_type", "expires_in"}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fmserve.errors import BadGateway

REFRESH_MARGIN_S = 300.0  # fetch again this long before a token expires
DEFAULT_LIFETIME_S = 3600.0  # when the answer has no expires_in


class TokenSource:
    """An access token fetched on first use and again before it expires.

    Args:
        issuer: who issues the tokens, for error messages (``"Microsoft Entra ID"``).
        fetch: makes one token request and returns the decoded answer (RFC 6749 §5.1);
            the errors it raises reach the caller, and the next call tries again.
        on_token: called with each new token (e.g. to scrub it from error messages).
        margin_s: seconds before expiry at which a token is fetched again (at most half
            its lifetime).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, issuer: str, fetch: Callable[[], Awaitable[Any]], *,
                 on_token: Callable[[str], None] | None = None,
                 margin_s: float = REFRESH_MARGIN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._on_token = on_token
        self._margin_s = margin_s
        self._clock = clock
        self._cached: tuple[str, float] | None = None  # (token, refresh at, clock seconds)
        self._lock = asyncio.Lock()

    def _fresh(self) -> str | None:
        cached = self._cached
        return cached[0] if cached is not None and self._clock() < cached[1] else None

    async def token(self) -> str:
        """The current access token (one request at a time when it must be fetched).

        Raises:
            BadGateway: the answer has no ``access_token``; whatever ``fetch`` raises.
        """
        token = self._fresh()
        if token is not None:
            return token
        async with self._lock:
            token = self._fresh()
            if token is not None:
                return token
            answer = await self._fetch()
            token = answer.get("access_token") if isinstance(answer, dict) else None
            if not token:
                raise BadGateway(f"{self.issuer} answered without an access_token.")
            token = str(token)
            if self._on_token is not None:
                self._on_token(token)
            life = float(answer.get("expires_in") or DEFAULT_LIFETIME_S)
            self._cached = (token, self._clock() + max(life - self._margin_s, life / 2))
            return token
