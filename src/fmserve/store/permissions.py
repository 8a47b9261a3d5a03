"""Direct grants on serving endpoints and secret-scope ACLs (blocking I/O; see
``store/principals.py``). Reads are served from the in-memory directory."""

from __future__ import annotations

from sqlalchemy import delete, select

from fmserve.store.db import Database
from fmserve.store.models import EndpointPermission, SecretAcl


class PermissionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def set_grants(self, endpoint_id: str, grants: dict[str, str], *, replace: bool) -> None:
        """``grants`` maps principal id → level. ``replace`` drops every other direct grant
        of the endpoint first (``PUT`` semantics); otherwise the listed ones are upserted
        (``PATCH``)."""
        with self.db.session() as s, s.begin():
            if replace:
                s.execute(delete(EndpointPermission).where(
                    EndpointPermission.endpoint_id == endpoint_id))
            else:
                s.execute(delete(EndpointPermission).where(
                    EndpointPermission.endpoint_id == endpoint_id,
                    EndpointPermission.principal_id.in_(list(grants))))
            for pid, level in grants.items():
                s.add(EndpointPermission(endpoint_id=endpoint_id, principal_id=pid,
                                         level=level))

    def drop_endpoint(self, endpoint_id: str) -> None:
        with self.db.session() as s, s.begin():
            s.execute(delete(EndpointPermission).where(
                EndpointPermission.endpoint_id == endpoint_id))

    def put_acl(self, scope: str, principal: str, permission: str) -> None:
        with self.db.session() as s, s.begin():
            row = s.get(SecretAcl, (scope, principal))
            if row is None:
                s.add(SecretAcl(scope=scope, principal=principal, permission=permission))
            else:
                row.permission = permission

    def delete_acl(self, scope: str, principal: str) -> bool:
        """False when there was no such entry."""
        with self.db.session() as s, s.begin():
            row = s.get(SecretAcl, (scope, principal))
            if row is None:
                return False
            s.delete(row)
            return True

    def drop_scope(self, scope: str) -> None:
        with self.db.session() as s, s.begin():
            s.execute(delete(SecretAcl).where(SecretAcl.scope == scope))

    def acls(self, scope: str) -> list[tuple[str, str]]:
        """``(principal, permission)`` pairs of a scope."""
        with self.db.session() as s:
            return [(p, perm) for p, perm in s.execute(
                select(SecretAcl.principal, SecretAcl.permission).where(
                    SecretAcl.scope == scope).order_by(SecretAcl.principal))]
