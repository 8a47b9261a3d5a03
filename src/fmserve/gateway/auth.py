"""Authentication of API callers (spec §3.2–3.4, governance §4.2, §4.5).

Accepted ``Authorization`` headers, all answering the same :class:`Principal`:

* ``Bearer <pat>`` — databricks-sdk PAT auth, the OpenAI client (``api_key``).
* ``Basic base64("token:<pat>")`` — curl ``-u token:$DATABRICKS_TOKEN`` as in the
  Databricks docs; the password is the PAT whatever the user name.
* ``Bearer <OAuth access token>`` — a JWT minted by ``POST /oidc/v1/token`` (OAuth M2M,
  databricks-sdk ``client_id``/``client_secret``); the scheme is matched
  case-insensitively, as the SDK sends ``{token_type} {access_token}`` verbatim.

Costs: an OAuth token is verified by its signature (no database read) and the result
cached by token; a PAT is looked up once in the database (in a worker thread) and cached
for ``cache_ttl_s`` seconds. Either way the principal (groups, admin) comes from the
in-memory :class:`~fmserve.gateway.directory.Directory`, so a membership change applies
to the next request. Revocation: a PAT deleted through this server stops at once, one
deleted through another replica within ``cache_ttl_s`` (5 s); an OAuth token stops when
its client secret is deleted or expires, or its principal is deleted or deactivated —
at once here, within the directory sync interval (2 s) elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, replace

from fmserve.errors import Unauthenticated
from fmserve.gateway.directory import Directory, Principal
from fmserve.gateway.oauth import TokenSigner, looks_like_jwt
from fmserve.store.db import now_ms
from fmserve.store.tokens import TokenInfo, TokenStore, hash_token

__all__ = ["Authenticator", "Principal", "token_from_header"]

_HINT = ("Send 'Authorization: Bearer <token>' (or curl -u token:<token>), with a personal "
         "access token or an OAuth access token from /oidc/v1/token.")
_MAX_CACHE = 10_000


def token_from_header(header: str | None) -> str:
    """The token carried by an ``Authorization`` header.

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


@dataclass
class _Pat:
    until: float  # monotonic s: re-read the database after this
    info: TokenInfo
    version: int  # directory version the principal was built from
    principal: Principal | None


@dataclass
class _Jwt:
    exp: float  # s since epoch
    pid: str
    sid: str
    version: int
    principal: Principal | None


class Authenticator:
    def __init__(self, tokens: TokenStore, directory: Directory, signer: TokenSigner,
                 cache_ttl_s: float = 5.0) -> None:
        self.tokens = tokens
        self.directory = directory
        self.signer = signer
        self.cache_ttl_s = cache_ttl_s
        self._pats: dict[str, _Pat] = {}
        self._jwts: dict[str, _Jwt] = {}

    def cached(self, header: str | None) -> Principal | None:
        """The caller, or None when the database must be asked (a PAT not seen lately).

        Does no I/O, so the event loop can call it directly.

        Raises:
            Unauthenticated: 401 for a missing or malformed header, an invalid or expired
                OAuth token, or a cached PAT that expired or whose owner is gone.
        """
        token = token_from_header(header)
        if looks_like_jwt(token):
            return self._oauth(token)
        hit = self._pats.get(hash_token(token))
        if hit is None or hit.until < time.monotonic():
            return None
        return self._pat_principal(hit)

    def authenticate(self, header: str | None) -> Principal:
        """The caller of a request. Blocking (a PAT cache miss reads the database).

        Raises:
            Unauthenticated: 401 for a missing, unknown, revoked or expired token.
        """
        hit = self.cached(header)
        if hit is not None:
            return hit
        token = token_from_header(header)
        key = hash_token(token)
        info = self.tokens.verify(token)
        if info is None:
            self._pats.pop(key, None)
            raise Unauthenticated(f"Invalid access token. {_HINT}")
        if len(self._pats) > _MAX_CACHE:
            self._pats.clear()
        entry = _Pat(time.monotonic() + self.cache_ttl_s, info, -1, None)
        self._pats[key] = entry
        return self._pat_principal(entry)

    def forget(self, token_id: str) -> None:
        """Drop a revoked PAT from the cache (it stops working at once)."""
        for key, entry in list(self._pats.items()):
            if entry.info.token_id == token_id:
                self._pats.pop(key, None)

    def _pat_principal(self, entry: _Pat) -> Principal:
        if entry.info.expired(now_ms()):
            raise Unauthenticated(f"The access token has expired. {_HINT}")
        if entry.version != self.directory.version:
            p = self.directory.principal(entry.info.owner_id)
            entry.principal = (replace(p, auth_type="pat", token_id=entry.info.token_id)
                               if p else None)
            entry.version = self.directory.version
        if entry.principal is None:
            raise Unauthenticated("The access token's owner no longer exists or is inactive.")
        return entry.principal

    def _oauth(self, token: str) -> Principal:
        entry = self._jwts.get(token)
        if entry is None:
            claims = self.signer.verify(token)
            if claims is None:
                raise Unauthenticated(f"Invalid or expired OAuth access token. {_HINT}")
            if len(self._jwts) > _MAX_CACHE:
                self._jwts.clear()
            entry = _Jwt(float(claims["exp"]), str(claims["pid"]), str(claims["sid"]), -1, None)
            self._jwts[token] = entry
        if entry.exp <= time.time():
            self._jwts.pop(token, None)
            raise Unauthenticated(f"The OAuth access token has expired. {_HINT}")
        if entry.version != self.directory.version:
            p = self.directory.principal(entry.pid)
            live = p is not None and self.directory.secret_live(entry.sid, entry.pid)
            entry.principal = replace(p, auth_type="oauth", token_id=entry.sid) if live and p \
                else None
            entry.version = self.directory.version
        if entry.principal is None:
            raise Unauthenticated("The OAuth access token was revoked: its client secret or "
                                  "service principal no longer exists, expired or is inactive.")
        return entry.principal
