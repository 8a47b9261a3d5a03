"""Personal access tokens: ``dapi`` + 32 hex characters, stored as SHA-256 only."""

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
    owner: str
    is_admin: bool
    creation_time: int  # ms
    expiry_time: int  # ms, -1 = never
    revoked: bool


def _info(row: Token) -> TokenInfo:
    return TokenInfo(row.token_id, row.comment, row.owner, row.is_admin, row.creation_time,
                     row.expiry_time, row.revoked)


class TokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, comment: str = "", owner: str = "admin", is_admin: bool = False,
               lifetime_s: int | None = None) -> tuple[str, TokenInfo]:
        """Create a token. Returns ``(plaintext, info)``; the plaintext is not stored."""
        token = "dapi" + secrets.token_hex(16)
        now = now_ms()
        row = Token(token_id=secrets.token_hex(8), token_hash=hash_token(token), comment=comment,
                    owner=owner, is_admin=is_admin, creation_time=now,
                    expiry_time=now + lifetime_s * 1000 if lifetime_s else -1, revoked=False)
        with self.db.session() as s, s.begin():
            s.add(row)
        return token, _info(row)

    def verify(self, token: str) -> TokenInfo | None:
        """The token's info if it exists, is not revoked and not expired."""
        with self.db.session() as s:
            row = s.scalar(select(Token).where(Token.token_hash == hash_token(token)))
        if row is None or row.revoked:
            return None
        if row.expiry_time != -1 and row.expiry_time < now_ms():
            return None
        return _info(row)

    def list(self) -> list[TokenInfo]:
        with self.db.session() as s:
            return [_info(r) for r in s.scalars(select(Token).order_by(Token.creation_time))]

    def revoke(self, token_id: str) -> bool:
        """Revoke by id; False if no such token."""
        with self.db.session() as s, s.begin():
            row = s.get(Token, token_id)
            if row is None:
                return False
            row.revoked = True
            return True

    def count_active(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Token)
                                .where(Token.revoked.is_(False))) or 0)
