"""OAuth access tokens: RS256-signed JWTs, verified without a database read.

``POST /oidc/v1/token`` (grant ``client_credentials``, spec governance §4.2) mints one
for a service principal; :class:`TokenSigner` signs and verifies them with PyJWT. The
signing key is an RSA-2048 key generated once and stored encrypted
(``store/credentials.py``); every replica on the same database loads the same keys, and
``GET /oidc/jwks.json`` publishes their public halves (RFC 7517).

Claims: ``iss`` (``<host>/oidc``), ``sub`` and ``client_id`` (the service principal's
``applicationId``), ``pid`` (its SCIM id), ``sid`` (the client secret it was minted
with), ``scope``, ``iat``, ``exp`` (``iat`` + 3600 s), ``jti``. A token is honoured only
while its secret still exists (see :meth:`fmserve.gateway.directory.Directory.secret_live`).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fmserve.errors import FmserveError
from fmserve.store.credentials import CredentialStore

ACCESS_TOKEN_LIFETIME_S = 3600  # "Each access token is valid for one hour" (Databricks docs)
ALGORITHM = "RS256"


def looks_like_jwt(token: str) -> bool:
    """A compact JWS (three base64url parts; the header starts ``eyJ``), not a PAT."""
    return token.startswith("eyJ") and token.count(".") == 2


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class TokenSigner:
    """Signs and verifies access tokens with the stored keys (the newest signs)."""

    def __init__(self, keys: dict[str, rsa.RSAPrivateKey]) -> None:
        if not keys:
            raise ValueError("TokenSigner needs at least one key")
        self._keys = keys
        self._public = {kid: k.public_key() for kid, k in keys.items()}
        self.kid = list(keys)[-1]

    @classmethod
    def load(cls, store: CredentialStore, seal: Callable[[str], str],
             open_: Callable[[str], str]) -> TokenSigner:
        """The stored keys, creating the first one if there is none. Blocking."""
        stored = store.signing_keys()
        if not stored:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode("ascii")
            kid = hashlib.sha256(pem.encode()).hexdigest()[:16]
            store.add_signing_key(kid, seal(pem))  # loses to a concurrent replica: fine
            stored = store.signing_keys()
        keys: dict[str, rsa.RSAPrivateKey] = {}
        for kid, encrypted in stored:
            try:
                pem = open_(encrypted)
            except FmserveError:
                raise RuntimeError(
                    "The OAuth signing key stored in the database cannot be decrypted with "
                    "this server's secrets key. Every server sharing a database must use the "
                    "same key: set FMSERVE_SECRETS_KEY to the same value on each (or copy "
                    "<data dir>/secrets.key).") from None
            loaded = serialization.load_pem_private_key(pem.encode(), password=None)
            if isinstance(loaded, rsa.RSAPrivateKey):
                keys[kid] = loaded
        return cls(keys)

    def mint(self, *, issuer: str, application_id: str, principal_id: str, secret_id: str,
             scope: str, lifetime_s: int = ACCESS_TOKEN_LIFETIME_S) -> str:
        now = int(time.time())
        claims = {"iss": issuer, "sub": application_id, "client_id": application_id,
                  "pid": principal_id, "sid": secret_id, "scope": scope, "iat": now,
                  "exp": now + lifetime_s, "jti": secrets.token_hex(8)}
        return jwt.encode(claims, self._keys[self.kid], algorithm=ALGORITHM,
                          headers={"kid": self.kid})

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this server signed and that has not expired, else None."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._public.get(kid) if isinstance(kid, str) else None
            if key is None:
                return None
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM],
                options={"require": ["exp", "iat", "sub", "pid", "sid"], "verify_aud": False})
        except jwt.PyJWTError:
            return None
        return claims

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set (RFC 7517 §5)."""
        keys = []
        for kid, pub in self._public.items():
            nums = pub.public_numbers()
            keys.append({"kty": "RSA", "kid": kid, "use": "sig", "alg": ALGORITHM,
                         "n": _b64(nums.n), "e": _b64(nums.e)})
        return {"keys": keys}
