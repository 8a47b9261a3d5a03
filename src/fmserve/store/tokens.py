"""Personal access tokens: ``dapi`` + 32 hex characters, stored as SHA-256 only.

A token belongs to a principal (``owner_id``: a user or a service principal, whose
id is the SCIM ``id``); ``created_by_id`` is who made it (an admin, for tokens made on
behalf of a service principal). Revoked tokens are kept (with ``revoked``) so their
ids stay unique; the API lists only live ones.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select

from fmserve.store.db import Database, now_ms
from fmserve.store.models import Token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    comment: str
    owner_id: str | None
    created_by_id: str | None
    creation_time: int  # ms
    expiry_time: int  # ms, -1 = never
    revoked: bool

    def expired(self, at_ms: int | None = None) -> bool:
        return self.expiry_time != -1 and self.expiry_time < (at_ms or now_ms())


def _info(row: Token) -> TokenInfo:
    return TokenInfo(row.token_id, row.comment, row.owner_id, row.created_by_id,
                     row.creation_time, row.expiry_time, row.revoked)


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, owner_id: str, comment: str = "", lifetime_s: int | None = None,
               created_by_id: str | None = None) -> tuple[str, TokenInfo]:
        """Create a token for ``owner_id``. Returns ``(plaintext, info)``; the plaintext is
        not stored. ``lifetime_s`` None or ≤ 0 means it never expires."""
        token = "dapi" + secrets.token_hex(16)
        now = now_ms()
        row = Token(token_id=secrets.token_hex(8), token_hash=hash_token(token), comment=comment,
                    owner=owner_id, owner_id=owner_id, created_by_id=created_by_id or owner_id,
                    is_admin=False, creation_time=now,
                    expiry_time=now + lifetime_s * 1000 if lifetime_s and lifetime_s > 0 else -1,
                    revoked=False)
        with self.db.session() as s, s.begin():
            s.add(row)
        return token, _info(row)

    def verify(self, token: str) -> TokenInfo | None:
        """The token's info if it exists, is not revoked and not expired."""
        with self.db.session() as s:
            row = s.scalar(select(Token).where(Token.token_hash == hash_token(token)))
        if row is None or row.revoked:
            return None
        info = _info(row)
        return None if info.expired() else info

    def get(self, token_id: str) -> TokenInfo | None:
        """A live (not revoked) token by id, or None."""
        with self.db.session() as s:
            row = s.get(Token, token_id)
        return None if row is None or row.revoked else _info(row)

    def list(self, owner_id: str | None = None,
             created_by_id: str | None = None) -> list[TokenInfo]:
        """Live tokens (not revoked; expired ones included), oldest first."""
        q = select(Token).where(Token.revoked.is_(False)).order_by(Token.creation_time)
        if owner_id is not None:
            q = q.where(Token.owner_id == owner_id)
        if created_by_id is not None:
            q = q.where(Token.created_by_id == created_by_id)
        with self.db.session() as s:
            return [_info(r) for r in s.scalars(q)]

    def revoke(self, token_id: str) -> bool:
        """Revoke by id; False if no such live token."""
        with self.db.session() as s, s.begin():
            row = s.get(Token, token_id)
            if row is None or row.revoked:
                return False
            row.revoked = True
            return True

    def count_active(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Token)
                                .where(Token.revoked.is_(False))) or 0)
