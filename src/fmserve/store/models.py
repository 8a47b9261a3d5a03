"""Tables. Changes here need a migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Token(Base):
    """A personal access token; only its SHA-256 is kept."""

    __tablename__ = "tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    comment: Mapped[str] = mapped_column(String(1024), default="")
    owner: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    creation_time: Mapped[int] = mapped_column(BigInteger)  # ms since epoch
    expiry_time: Mapped[int] = mapped_column(BigInteger, default=-1)  # ms; -1 = never
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Setting(Base):
    """Workspace-wide key/value settings (e.g. ``workspace_id``)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(4096))
