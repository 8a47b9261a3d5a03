"""Service-principal OAuth secrets and the keys that sign OAuth access tokens
(blocking I/O; see ``store/principals.py``).

A client secret is ``dose`` + 64 hex characters; only its SHA-256 is stored, and the
value is returned once, by :meth:`CredentialStore.create_secret`. Signing keys are
kept encrypted with the server's secrets key (``store/secrets.py``).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fmserve.store.db import Database, now_ms
from fmserve.store.models import ServicePrincipalSecret, SigningKey
from fmserve.store.tokens import hash_token

SECRET_PREFIX = "dose"
DEFAULT_SECRET_LIFETIME_S = 730 * 86400  # Databricks: "730 days (63072000s)"


@dataclass(frozen=True)
class SecretInfo:
    id: str
    sp_id: str
    secret_hash: str  # the first characters of the hash, as a display handle
    create_time: int  # ms
    update_time: int  # ms
    expire_time: int  # ms
    scopes: list[str] | None

    @property
    def status(self) -> str:
        return "ACTIVE" if self.expire_time > now_ms() else "EXPIRED"


def _info(row: ServicePrincipalSecret) -> SecretInfo:
    return SecretInfo(row.id, row.sp_id, row.secret_hash_prefix, row.create_time,
                      row.update_time, row.expire_time, row.scopes)


class CredentialStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create_secret(self, sp_id: str, lifetime_s: int | None = None,
                      scopes: list[str] | None = None) -> tuple[str, SecretInfo]:
        """A new client secret for service principal ``sp_id`` (the caller checked that it
        exists). Returns ``(secret value, info)``; the value is not stored."""
        value = SECRET_PREFIX + secrets.token_hex(32)
        digest = hash_token(value)
        now = now_ms()
        row = ServicePrincipalSecret(
            id=secrets.token_hex(8), sp_id=sp_id, secret_hash=digest,
            secret_hash_prefix=digest[:8], create_time=now, update_time=now,
            expire_time=now + 1000 * (lifetime_s or DEFAULT_SECRET_LIFETIME_S),
            scopes=scopes or None)
        with self.db.session() as s, s.begin():
            s.add(row)
        return value, _info(row)

    def secrets(self, sp_id: str) -> list[SecretInfo]:
        with self.db.session() as s:
            return [_info(r) for r in s.scalars(select(ServicePrincipalSecret).where(
                ServicePrincipalSecret.sp_id == sp_id).order_by(
                ServicePrincipalSecret.create_time))]

    def delete_secret(self, sp_id: str, secret_id: str) -> bool:
        """False when the service principal has no such secret."""
        with self.db.session() as s, s.begin():
            row = s.get(ServicePrincipalSecret, secret_id)
            if row is None or row.sp_id != sp_id:
                return False
            s.delete(row)
            return True

    def verify_secret(self, sp_id: str, value: str) -> SecretInfo | None:
        """The secret of ``sp_id`` whose value is ``value``, if it exists and has not
        expired."""
        digest = hash_token(value)
        with self.db.session() as s:
            row = s.scalar(select(ServicePrincipalSecret).where(
                ServicePrincipalSecret.secret_hash == digest))
        if row is None or not hmac.compare_digest(row.sp_id, sp_id):
            return None
        if row.expire_time <= now_ms():
            return None
        return _info(row)

    def signing_keys(self) -> list[tuple[str, str]]:
        """``(kid, encrypted private key)``, oldest first."""
        with self.db.session() as s:
            return [(k, v) for k, v in s.execute(select(
                SigningKey.kid, SigningKey.private_key_encrypted).order_by(
                SigningKey.creation_time))]

    def add_signing_key(self, kid: str, encrypted: str) -> bool:
        """False when another process stored a key with that id first."""
        try:
            with self.db.session() as s, s.begin():
                s.add(SigningKey(kid=kid, private_key_encrypted=encrypted,
                                 creation_time=now_ms()))
        except IntegrityError:
            return False
        return True
