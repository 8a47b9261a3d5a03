"""Users, service principals and groups (table ``principals``) and group membership.

Blocking database I/O: the server calls this store from a worker thread, never on the
event loop, and answers reads from :class:`fmserve.gateway.directory.Directory`, an
in-memory snapshot that :meth:`PrincipalStore.snapshot` fills.

Ids are numeric strings (16 digits), as Databricks workspaces show them. Kinds:
``user`` (``name`` = ``userName``), ``service_principal`` (``name`` = ``applicationId``)
and ``group`` (``name`` = ``displayName``). The built-in groups ``admins`` and ``users``
exist from :meth:`PrincipalStore.ensure_builtins` on; every user and service principal
is a member of ``users``.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fmserve.errors import ResourceAlreadyExists, ResourceDoesNotExist
from fmserve.store.db import Database, now_ms
from fmserve.store.models import (
    EndpointPermission,
    GroupMember,
    PrincipalRow,
    SecretAcl,
    ServicePrincipalSecret,
    Token,
)

USER, SERVICE_PRINCIPAL, GROUP = "user", "service_principal", "group"
KINDS = (USER, SERVICE_PRINCIPAL, GROUP)
ADMINS, USERS = "admins", "users"


@dataclass(frozen=True)
class PrincipalRecord:
    id: str
    kind: str
    name: str
    display_name: str
    active: bool
    external_id: str | None
    attrs: dict[str, Any]
    creation_time: int  # ms


@dataclass(frozen=True)
class Snapshot:
    """Everything the in-memory directory needs, read in one transaction."""

    principals: list[PrincipalRecord]
    members: list[tuple[str, str]]  # (group_id, member_id)
    grants: list[tuple[str, str, str]]  # (endpoint_id, principal_id, level)
    secret_acls: list[tuple[str, str, str]]  # (scope, principal name, permission)
    sp_secrets: list[tuple[str, str, int]]  # (secret_id, sp_id, expire_time ms)
    first_admin: str | None = None  # id of the oldest member of admins
    extra: dict[str, Any] = field(default_factory=dict)


def _record(row: PrincipalRow) -> PrincipalRecord:
    return PrincipalRecord(row.id, row.kind, row.name, row.display_name, row.active,
                           row.external_id, dict(row.attrs or {}), row.creation_time)


def new_id() -> str:
    return str(secrets.randbelow(9 * 10**15) + 10**15)


class PrincipalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- built-ins -------------------------------------------------------------------
    def ensure_builtins(self, admin_user_name: str) -> tuple[str, bool]:
        """Creates the groups ``admins`` and ``users`` and, when ``admins`` has no member,
        the first admin user ``admin_user_name`` in both. Tokens from before principals
        existed (no owner) become the first admin's. Idempotent; safe to run from several
        processes at once.

        Returns:
            ``(first admin id, created)`` — ``created`` is True when this call made the user.
        """
        for _ in range(3):
            try:
                return self._ensure_builtins(admin_user_name)
            except IntegrityError:  # another process created the same rows first
                continue
        return self._ensure_builtins(admin_user_name)

    def _ensure_builtins(self, admin_user_name: str) -> tuple[str, bool]:
        created = False
        with self.db.session() as s, s.begin():
            groups = {}
            for name in (ADMINS, USERS):
                row = s.scalar(select(PrincipalRow).where(PrincipalRow.kind == GROUP,
                                                          PrincipalRow.name == name))
                if row is None:
                    row = PrincipalRow(id=new_id(), kind=GROUP, name=name, display_name=name,
                                       active=True, attrs={}, creation_time=now_ms())
                    s.add(row)
                    s.flush()
                groups[name] = row.id
            admin = self._first_admin(s, groups[ADMINS])
            if admin is None:
                row = s.scalar(select(PrincipalRow).where(PrincipalRow.kind == USER,
                                                          PrincipalRow.name == admin_user_name))
                if row is None:
                    row = PrincipalRow(id=new_id(), kind=USER, name=admin_user_name,
                                       display_name="Administrator", active=True,
                                       attrs={"emails": [{"value": admin_user_name,
                                                          "primary": True, "type": "work"}]},
                                       creation_time=now_ms())
                    s.add(row)
                    s.flush()
                    s.add(GroupMember(group_id=groups[USERS], member_id=row.id))
                    created = True
                s.add(GroupMember(group_id=groups[ADMINS], member_id=row.id))
                admin = row.id
            s.execute(update(Token).where(Token.owner_id.is_(None)).values(owner_id=admin))
            return admin, created

    @staticmethod
    def _first_admin(s: Session, admins_id: str) -> str | None:
        return s.scalar(select(PrincipalRow.id).join(
            GroupMember, GroupMember.member_id == PrincipalRow.id).where(
            GroupMember.group_id == admins_id, PrincipalRow.kind == USER).order_by(
            PrincipalRow.creation_time).limit(1))

    # -- principals --------------------------------------------------------------------
    def create(self, kind: str, name: str | None, *, display_name: str = "",
               active: bool = True, external_id: str | None = None,
               attrs: dict[str, Any] | None = None,
               members: list[str] | None = None) -> PrincipalRecord:
        """Insert a principal (a service principal without ``name`` gets a new UUID
        ``applicationId``); users and service principals join ``users``.

        Raises:
            ResourceAlreadyExists: 409 when the kind already has that name.
            ResourceDoesNotExist: 404 for an unknown member id.
        """
        if kind == SERVICE_PRINCIPAL and not name:
            name = str(uuid.uuid4())
        assert name
        row = PrincipalRow(id=new_id(), kind=kind, name=name, display_name=display_name,
                           active=active, external_id=external_id, attrs=attrs or {},
                           creation_time=now_ms())
        try:
            with self.db.session() as s, s.begin():
                s.add(row)
                s.flush()
                if kind != GROUP:
                    users = s.scalar(select(PrincipalRow.id).where(
                        PrincipalRow.kind == GROUP, PrincipalRow.name == USERS))
                    if users is not None:
                        s.add(GroupMember(group_id=users, member_id=row.id))
                else:
                    self._set_members(s, row.id, members or [])
        except IntegrityError:
            what = {USER: "User with userName", SERVICE_PRINCIPAL:
                    "Service principal with applicationId", GROUP: "Group with displayName"}
            raise ResourceAlreadyExists(f"{what[kind]} '{name}' already exists.") from None
        return _record(row)

    def get(self, principal_id: str, kind: str | None = None) -> PrincipalRecord:
        """Raises: ResourceDoesNotExist (404)."""
        with self.db.session() as s:
            row = s.get(PrincipalRow, principal_id)
        if row is None or (kind is not None and row.kind != kind):
            raise ResourceDoesNotExist(f"{_label(kind)} with id '{principal_id}' does not exist.")
        return _record(row)

    def update(self, principal_id: str, kind: str, *, display_name: str | None = None,
               active: bool | None = None, external_id: str | None = None,
               attrs: dict[str, Any] | None = None, name: str | None = None,
               members: list[str] | None = None) -> PrincipalRecord:
        """Change the given fields (None = unchanged); ``members`` replaces a group's.

        Raises:
            ResourceDoesNotExist: 404 for an unknown principal or member.
            ResourceAlreadyExists: 409 when a group is renamed to a taken name.
        """
        try:
            with self.db.session() as s, s.begin():
                row = s.get(PrincipalRow, principal_id)
                if row is None or row.kind != kind:
                    raise ResourceDoesNotExist(
                        f"{_label(kind)} with id '{principal_id}' does not exist.")
                if display_name is not None:
                    row.display_name = display_name
                if active is not None:
                    row.active = active
                if external_id is not None:
                    row.external_id = external_id
                if attrs is not None:
                    row.attrs = attrs
                if name is not None:
                    row.name = name
                if members is not None:
                    self._set_members(s, principal_id, members)
                s.flush()
                return _record(row)
        except IntegrityError:
            raise ResourceAlreadyExists(f"A {_label(kind).lower()} named '{name}' already "
                                        "exists.") from None

    def delete(self, principal_id: str, kind: str) -> None:
        """Delete a principal with its memberships, grants, tokens and secrets.

        Raises:
            ResourceDoesNotExist: 404.
            InvalidParameterValue: the built-in groups cannot be deleted.
        """
        from fmserve.errors import InvalidParameterValue

        with self.db.session() as s, s.begin():
            row = s.get(PrincipalRow, principal_id)
            if row is None or row.kind != kind:
                raise ResourceDoesNotExist(
                    f"{_label(kind)} with id '{principal_id}' does not exist.")
            if kind == GROUP and row.name in (ADMINS, USERS):
                raise InvalidParameterValue(f"The built-in group '{row.name}' cannot be "
                                            "deleted.")
            s.execute(delete(GroupMember).where(GroupMember.member_id == principal_id))
            s.execute(delete(GroupMember).where(GroupMember.group_id == principal_id))
            s.execute(delete(EndpointPermission).where(
                EndpointPermission.principal_id == principal_id))
            s.execute(delete(SecretAcl).where(SecretAcl.principal == row.name))
            s.execute(update(Token).where(Token.owner_id == principal_id).values(revoked=True))
            s.execute(delete(ServicePrincipalSecret).where(
                ServicePrincipalSecret.sp_id == principal_id))
            s.delete(row)

    def _set_members(self, s: Session, group_id: str, member_ids: list[str]) -> None:
        wanted = list(dict.fromkeys(member_ids))
        if wanted:
            found = set(s.scalars(select(PrincipalRow.id).where(PrincipalRow.id.in_(wanted))))
            missing = [m for m in wanted if m not in found]
            if missing:
                raise ResourceDoesNotExist(f"Member id '{missing[0]}' does not exist.")
            if group_id in wanted:
                from fmserve.errors import InvalidParameterValue
                raise InvalidParameterValue("A group cannot be a member of itself.")
        s.execute(delete(GroupMember).where(GroupMember.group_id == group_id))
        for m in wanted:
            s.add(GroupMember(group_id=group_id, member_id=m))

    def set_groups(self, member_id: str, group_ids: list[str]) -> None:
        """Make ``member_id`` a member of exactly ``group_ids`` (plus ``users`` for users and
        service principals), as a user's ``groups`` attribute is written.

        Raises:
            ResourceDoesNotExist: 404 for an unknown group id.
        """
        with self.db.session() as s, s.begin():
            wanted = set(group_ids)
            found = set(s.scalars(select(PrincipalRow.id).where(
                PrincipalRow.id.in_(wanted), PrincipalRow.kind == GROUP))) if wanted else set()
            missing = wanted - found
            if missing:
                raise ResourceDoesNotExist(f"Group id '{sorted(missing)[0]}' does not exist.")
            users = s.scalar(select(PrincipalRow.id).where(PrincipalRow.kind == GROUP,
                                                           PrincipalRow.name == USERS))
            member = s.get(PrincipalRow, member_id)
            if member is not None and member.kind != GROUP and users:
                wanted.add(users)
            s.execute(delete(GroupMember).where(GroupMember.member_id == member_id))
            for g in wanted:
                s.add(GroupMember(group_id=g, member_id=member_id))

    # -- the directory's source ------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Every principal, membership, endpoint grant, secret ACL and live service-
        principal secret, read in one transaction."""
        with self.db.session() as s, s.begin():
            principals = [_record(r) for r in s.scalars(select(PrincipalRow))]
            members = [(g, m) for g, m in s.execute(select(GroupMember.group_id,
                                                           GroupMember.member_id))]
            grants = [(e, p, lvl) for e, p, lvl in s.execute(select(
                EndpointPermission.endpoint_id, EndpointPermission.principal_id,
                EndpointPermission.level))]
            acls = [(sc, p, perm) for sc, p, perm in s.execute(select(
                SecretAcl.scope, SecretAcl.principal, SecretAcl.permission))]
            sps = [(i, sp, exp) for i, sp, exp in s.execute(select(
                ServicePrincipalSecret.id, ServicePrincipalSecret.sp_id,
                ServicePrincipalSecret.expire_time))]
            admins = s.scalar(select(PrincipalRow.id).where(PrincipalRow.kind == GROUP,
                                                            PrincipalRow.name == ADMINS))
            first = self._first_admin(s, admins) if admins else None
        return Snapshot(principals, members, grants, acls, sps, first)


def _label(kind: str | None) -> str:
    return {USER: "User", SERVICE_PRINCIPAL: "Service principal", GROUP: "Group"}.get(
        kind or "", "Principal")
