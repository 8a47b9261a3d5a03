"""Authentication of API callers (spec §3.2, §3.3).

Accepted ``Authorization`` headers:

* ``Bearer <pat>`` — databricks-sdk PAT auth, the OpenAI client (``api_key``).
* ``Basic base64("token:<pat>")`` — curl ``-u token:$DATABRICKS_TOKEN`` as in the
  Databricks docs; the password is the PAT whatever the user name.

Verified tokens are cached for ``cache_ttl_s`` seconds (a revoked token stops
working within that time), so the hot path does not touch the database.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass

from fmserve.errors import Unauthenticated
from fmserve.store.tokens import TokenStore, hash_token

_HINT = ("Send 'Authorization: Bearer <token>' (or curl -u token:<token>). "
         "Create a token with 'fmserve tokens create'.")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's owner (a user name or email)."""

    user: str
    token_id: str
    is_admin: bool


def token_from_header(header: str | None) -> str:
    """The PAT carried by an ``Authorization`` header.

    Raises:
        Unauthenticated: 401 when the header is missing or malformed.
    """
    if not header:
        raise Unauthenticated(f"Missing credentials. {_HINT}")
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated(f"Malformed Basic credentials. {_HINT}") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Unauthenticated(f"Unsupported or malformed Authorization header. {_HINT}")


class Authenticator:
    def __init__(self, tokens: TokenStore, cache_ttl_s: float = 5.0) -> None:
        self.tokens = tokens
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}

    def cached(self, header: str | None) -> Principal | None:
        """The caller from the cache, or None when the database must be asked.

        Does no I/O, so the event loop can call it directly.

        Raises:
            Unauthenticated: 401 when the header is missing or malformed.
        """
        hit = self._cache.get(hash_token(token_from_header(header)))
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return None

    def authenticate(self, header: str | None) -> Principal:
        """The caller of a request.

        Raises:
            Unauthenticated: 401 for a missing, unknown, revoked or expired token.
        """
        hit = self.cached(header)
        if hit is not None:
            return hit
        token = token_from_header(header)
        key = hash_token(token)
        now = time.monotonic()
        info = self.tokens.verify(token)
        if info is None:
            self._cache.pop(key, None)
            raise Unauthenticated(f"Invalid access token. {_HINT}")
        principal = Principal(info.owner, info.token_id, info.is_admin)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + self.cache_ttl_s, principal)
        return principal
