"""Who is who, in memory: principals, groups, grants and secret ACLs.

Every authenticated request needs its caller's groups and every endpoint check its
grants; neither may read the database on the event loop. :class:`Directory` holds an
immutable snapshot of the identity tables (``store/principals.py``) that readers use
without locks. :meth:`Directory.refresh` (blocking: run it in a thread) reloads it; the
server refreshes after each of its own identity writes and with every periodic sync
(``sync_interval_s``, 2 s by default), so a change made through another replica is seen
within that interval.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from fmserve.store.db import now_ms
from fmserve.store.principals import (
    ADMINS,
    GROUP,
    SERVICE_PRINCIPAL,
    USER,
    USERS,
    PrincipalRecord,
    PrincipalStore,
    Snapshot,
)


@dataclass(frozen=True)
class Principal:
    """The caller of a request: a user or a service principal.

    ``name`` is how the rest of the platform names it — a user's ``userName`` (email),
    a service principal's ``applicationId`` — the value of ``requester`` in usage and
    inference tables and of ``creator`` on endpoints. ``group_ids`` / ``group_names`` are
    every group it belongs to, directly or through nested groups (``users`` included).
    """

    id: str
    kind: str  # "user" | "service_principal"
    name: str
    display_name: str
    group_ids: frozenset[str]
    group_names: frozenset[str]
    is_admin: bool
    auth_type: str = "pat"  # "pat" | "oauth"
    token_id: str | None = None  # the PAT's id, or the OAuth client secret's id


@dataclass
class _State:
    records: dict[str, PrincipalRecord] = field(default_factory=dict)
    by_name: dict[tuple[str, str], str] = field(default_factory=dict)
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # member → groups
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # group → members
    principals: dict[str, Principal] = field(default_factory=dict)
    grants: dict[str, dict[str, str]] = field(default_factory=dict)
    secret_acls: dict[str, dict[str, str]] = field(default_factory=dict)
    sp_secrets: dict[str, tuple[str, int]] = field(default_factory=dict)
    first_admin: str | None = None
    group_ids: dict[str, str] = field(default_factory=dict)  # built-in name → id


def _key(kind: str, name: str) -> tuple[str, str]:
    return kind, name.lower()


def _closure(start: str, parents: dict[str, tuple[str, ...]]) -> set[str]:
    seen: set[str] = set()
    todo = list(parents.get(start, ()))
    while todo:
        g = todo.pop()
        if g not in seen:
            seen.add(g)
            todo.extend(parents.get(g, ()))
    return seen


def _build(snap: Snapshot) -> _State:
    st = _State(first_admin=snap.first_admin)
    for rec in snap.principals:
        st.records[rec.id] = rec
        st.by_name[_key(rec.kind, rec.name)] = rec.id
        if rec.kind == GROUP and rec.name in (ADMINS, USERS):
            st.group_ids[rec.name] = rec.id
    parents: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for g, m in snap.members:
        parents.setdefault(m, []).append(g)
        members.setdefault(g, []).append(m)
    st.parents = {k: tuple(v) for k, v in parents.items()}
    st.members = {k: tuple(v) for k, v in members.items()}
    admins = st.group_ids.get(ADMINS)
    for rec in snap.principals:
        if rec.kind == GROUP or not rec.active:
            continue
        groups = _closure(rec.id, st.parents)
        names = frozenset(st.records[g].name for g in groups if g in st.records)
        st.principals[rec.id] = Principal(rec.id, rec.kind, rec.name, rec.display_name,
                                          frozenset(groups), names, admins in groups)
    for endpoint_id, pid, level in snap.grants:
        st.grants.setdefault(endpoint_id, {})[pid] = level
    for scope, who, perm in snap.secret_acls:
        st.secret_acls.setdefault(scope, {})[who] = perm
    st.sp_secrets = {sid: (sp, exp) for sid, sp, exp in snap.sp_secrets}
    return st


class Directory:
    """The in-memory snapshot. Readers never block; :meth:`refresh` swaps it whole."""

    def __init__(self, store: PrincipalStore) -> None:
        self.store = store
        self._state = _State()
        self._lock = threading.Lock()
        self.version = 0

    def refresh(self) -> None:
        """Reload from the database. Blocking: call it from a worker thread."""
        with self._lock:
            state = _build(self.store.snapshot())
            self._state = state
            self.version += 1

    # -- principals ------------------------------------------------------------------
    def principal(self, principal_id: str | None) -> Principal | None:
        """The active user or service principal with that id, or None."""
        return self._state.principals.get(principal_id or "")

    def record(self, principal_id: str, kind: str | None = None) -> PrincipalRecord | None:
        rec = self._state.records.get(principal_id)
        return rec if rec is not None and (kind is None or rec.kind == kind) else None

    def find(self, kind: str, name: str) -> PrincipalRecord | None:
        """A principal by its name (user name, application id or group name; the match is
        case-insensitive)."""
        pid = self._state.by_name.get(_key(kind, name))
        return self._state.records.get(pid) if pid else None

    def records(self, kind: str) -> list[PrincipalRecord]:
        return sorted((r for r in self._state.records.values() if r.kind == kind),
                      key=lambda r: r.creation_time)

    def members(self, group_id: str) -> tuple[str, ...]:
        return self._state.members.get(group_id, ())

    def direct_groups(self, principal_id: str) -> tuple[str, ...]:
        return self._state.parents.get(principal_id, ())

    def builtin_group(self, name: str) -> str | None:
        """The id of ``admins`` or ``users``."""
        return self._state.group_ids.get(name)

    @property
    def first_admin(self) -> str | None:
        return self._state.first_admin

    def resolve_name(self, name: str) -> PrincipalRecord | None:
        """A user, service principal or group named ``name`` (the Secrets ACL API names
        principals without saying which kind)."""
        for kind in (USER, SERVICE_PRINCIPAL, GROUP):
            rec = self.find(kind, name)
            if rec is not None:
                return rec
        return None

    # -- grants ------------------------------------------------------------------------
    def grants(self, endpoint_id: str) -> dict[str, str]:
        """Direct grants on an endpoint: principal id → level."""
        return self._state.grants.get(endpoint_id, {})

    def secret_acls(self, scope: str) -> dict[str, str]:
        """A secret scope's ACL: principal name → ``READ`` | ``WRITE`` | ``MANAGE``."""
        return self._state.secret_acls.get(scope, {})

    def secret_live(self, secret_id: str, sp_id: str) -> bool:
        """Whether an OAuth client secret still exists, belongs to ``sp_id`` and has not
        expired (an access token minted from it stops working when this turns False)."""
        hit = self._state.sp_secrets.get(secret_id)
        return hit is not None and hit[0] == sp_id and hit[1] > now_ms()

    def ids(self, ids: Iterable[str]) -> list[PrincipalRecord]:
        return [r for r in (self._state.records.get(i) for i in ids) if r is not None]
