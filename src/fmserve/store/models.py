"""Tables. Changes here need a migration in ``migrations/versions``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text, UniqueConstraint
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
    owner_id: Mapped[str | None] = mapped_column(String(20), nullable=True, index=True)
    created_by_id: Mapped[str | None] = mapped_column(String(20), nullable=True)
    last_used_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms


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


class PrincipalRow(Base):
    """A user, service principal or group (SCIM resources; spec governance §4.3).

    ``name`` is what identifies the principal outside fmserve and is unique per kind: a
    user's ``userName`` (email), a service principal's ``applicationId`` (UUID, the OAuth
    ``client_id``), a group's ``displayName``. ``attrs`` holds the other SCIM attributes
    as received (``emails``, ``name``, ``entitlements``, ``roles``).
    """

    __tablename__ = "principals"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_principals_kind_name"),)

    id: Mapped[str] = mapped_column(String(20), primary_key=True)  # numeric string
    kind: Mapped[str] = mapped_column(String(24))  # user | service_principal | group
    name: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(255), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    external_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    creation_time: Mapped[int] = mapped_column(BigInteger)  # ms


class GroupMember(Base):
    """``member_id`` (a user, service principal or group) belongs to ``group_id``."""

    __tablename__ = "group_members"

    group_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    member_id: Mapped[str] = mapped_column(String(20), primary_key=True, index=True)


class ServicePrincipalSecret(Base):
    """An OAuth client secret of a service principal; only its SHA-256 is kept."""

    __tablename__ = "sp_secrets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sp_id: Mapped[str] = mapped_column(String(20), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash_prefix: Mapped[str] = mapped_column(String(8))  # shown as secret_hash
    create_time: Mapped[int] = mapped_column(BigInteger)  # ms
    update_time: Mapped[int] = mapped_column(BigInteger)  # ms
    expire_time: Mapped[int] = mapped_column(BigInteger)  # ms
    scopes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class EndpointPermission(Base):
    """A direct grant on a serving endpoint (by endpoint ``id``)."""

    __tablename__ = "endpoint_permissions"

    endpoint_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    principal_id: Mapped[str] = mapped_column(String(20), primary_key=True, index=True)
    level: Mapped[str] = mapped_column(String(16))  # CAN_VIEW | CAN_QUERY | CAN_MANAGE


class SecretAcl(Base):
    """A secret-scope ACL entry: ``principal`` is a user name, group name or a service
    principal's application id, as the Secrets API names it."""

    __tablename__ = "secret_acls"

    scope: Mapped[str] = mapped_column(String(128), primary_key=True)
    principal: Mapped[str] = mapped_column(String(255), primary_key=True)
    permission: Mapped[str] = mapped_column(String(8))  # READ | WRITE | MANAGE


class SigningKey(Base):
    """A key that signs OAuth access tokens; the private key is Fernet-encrypted."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    private_key_encrypted: Mapped[str] = mapped_column(Text)
    creation_time: Mapped[int] = mapped_column(BigInteger)  # ms


class EndpointUsage(Base):
    """One request to an endpoint with usage tracking on: ``system.serving.endpoint_usage``
    (governance §2). Materialised from the request log; times in ms since the epoch."""

    __tablename__ = "endpoint_usage"

    databricks_request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    workspace_id: Mapped[str] = mapped_column(String(32))
    requester: Mapped[str] = mapped_column(String(255), index=True)
    status_code: Mapped[int] = mapped_column(Integer)
    request_time: Mapped[int] = mapped_column(BigInteger, index=True)
    input_token_count: Mapped[int] = mapped_column(BigInteger)
    output_token_count: Mapped[int] = mapped_column(BigInteger)
    input_character_count: Mapped[int] = mapped_column(BigInteger)
    output_character_count: Mapped[int] = mapped_column(BigInteger)
    usage_context: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    request_streaming: Mapped[bool] = mapped_column(Boolean)
    served_entity_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    endpoint_name: Mapped[str] = mapped_column(String(63), index=True)


class ServedEntityRow(Base):
    """One served entity of one endpoint config version: ``system.serving.served_entities``
    (a slowly changing dimension; the latest row has the highest config version)."""

    __tablename__ = "served_entities"

    served_entity_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str] = mapped_column(String(255))
    endpoint_name: Mapped[str] = mapped_column(String(63), index=True)
    endpoint_id: Mapped[str] = mapped_column(String(32))
    served_entity_name: Mapped[str] = mapped_column(String(255))
    entity_type: Mapped[str] = mapped_column(String(32))
    entity_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    entity_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    endpoint_config_version: Mapped[int] = mapped_column(Integer)
    task: Mapped[str | None] = mapped_column(String(64), nullable=True)
    external_model_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    foundation_model_config: Mapped[dict[str, Any] | None] = mapped_column(JSON,
                                                                           nullable=True)
    change_time: Mapped[int] = mapped_column(BigInteger)  # ms
    endpoint_delete_time: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class LogCheckpoint(Base):
    """How far a consumer (``usage``, ``inference``) has read a replica's request log."""

    __tablename__ = "log_checkpoints"

    consumer: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica: Mapped[str] = mapped_column(String(255), primary_key=True)
    segment: Mapped[str] = mapped_column(String(64))
    offset: Mapped[int] = mapped_column(BigInteger)
