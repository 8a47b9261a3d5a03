"""Tables. Changes here need a migration in ``migrations/versions``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text
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


class Endpoint(Base):
    """A user-created serving endpoint: its definition as the API received it.

    Runtime state (workers, readiness) is not stored; every server process that
    shares the database deploys the stored definition itself.
    """

    __tablename__ = "serving_endpoints"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    creator: Mapped[str] = mapped_column(String(255))
    creation_timestamp: Mapped[int] = mapped_column(BigInteger)  # ms
    last_updated_timestamp: Mapped[int] = mapped_column(BigInteger)  # ms
    description: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(64))
    config_version: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # EndpointCoreConfigInput
    tags: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    ai_gateway: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rate_limits: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class SecretScope(Base):
    """A secret scope (Databricks-backed style: secrets stored in this database)."""

    __tablename__ = "secret_scopes"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    creation_timestamp: Mapped[int] = mapped_column(BigInteger)  # ms


class Secret(Base):
    """One secret, its value encrypted with Fernet (never stored or returned in clear)."""

    __tablename__ = "secrets"

    scope: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value_encrypted: Mapped[str] = mapped_column(Text)
    last_updated_timestamp: Mapped[int] = mapped_column(BigInteger)  # ms
