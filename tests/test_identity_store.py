"""The identity stores and the in-memory directory, on SQLite and PostgreSQL."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from test_persistence import db, pg_url  # noqa: F401 - fixtures

from fmserve.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist
from fmserve.gateway.directory import Directory
from fmserve.gateway.policy import CAN_MANAGE, CAN_QUERY, CAN_VIEW, GatewayPolicy
from fmserve.store.credentials import CredentialStore
from fmserve.store.db import Database
from fmserve.store.permissions import PermissionStore
from fmserve.store.principals import GROUP, SERVICE_PRINCIPAL, USER, PrincipalStore
from fmserve.store.tokens import TokenStore


class _Ep:
    def __init__(self, endpoint_id: str, user_created: bool = True) -> None:
        self.name, self.id, self.user_created = f"ep-{endpoint_id}", endpoint_id, user_created


def test_builtins_first_admin_and_legacy_tokens(db: Database) -> None:  # noqa: F811
    tokens = TokenStore(db)
    with db.session() as s, s.begin():  # a token from before principals existed
        s.execute(text("INSERT INTO tokens (token_id, token_hash, comment, owner, is_admin, "
                       "creation_time, expiry_time, revoked) VALUES ('old', 'h', '', 'admin', "
                       ":t, 0, -1, :f)"), {"t": True, "f": False})
    store = PrincipalStore(db)
    admin, created = store.ensure_builtins("root@example.com")
    assert created
    assert store.ensure_builtins("someone-else@example.com") == (admin, False)  # idempotent
    assert tokens.get("old") is not None and tokens.get("old").owner_id == admin  # type: ignore[union-attr]
    d = Directory(store)
    d.refresh()
    p = d.principal(admin)
    assert p is not None and p.is_admin and p.name == "root@example.com"
    assert p.group_names == {"admins", "users"}
    assert d.first_admin == admin


def test_principals_groups_and_policy(db: Database) -> None:  # noqa: F811
    store = PrincipalStore(db)
    store.ensure_builtins("root@example.com")
    alice = store.create(USER, "alice@example.com", display_name="Alice")
    bot = store.create(SERVICE_PRINCIPAL, None, display_name="bot")
    assert len(bot.name) == 36  # a UUID applicationId
    with pytest.raises(ResourceAlreadyExists):
        store.create(USER, "alice@example.com")
    inner = store.create(GROUP, "inner", members=[alice.id])
    outer = store.create(GROUP, "outer", members=[inner.id, bot.id])
    with pytest.raises(ResourceDoesNotExist):
        store.create(GROUP, "broken", members=["404"])
    d = Directory(store)
    d.refresh()
    assert d.find(GROUP, "broken") is None  # the failed create stored nothing
    a = d.principal(alice.id)
    assert a is not None and not a.is_admin
    assert a.group_names == {"users", "inner", "outer"}  # nested groups count
    assert d.find(USER, "ALICE@example.com") == alice  # case-insensitive lookup

    perms = PermissionStore(db)
    perms.set_grants("e1", {outer.id: CAN_VIEW, alice.id: CAN_QUERY}, replace=True)
    d.refresh()
    policy = GatewayPolicy(d)
    b = d.principal(bot.id)
    assert b is not None
    assert policy.level(a, _Ep("e1")) == CAN_QUERY  # the highest of direct and group
    assert policy.level(b, _Ep("e1")) == CAN_VIEW
    assert policy.level(a, _Ep("e2")) is None
    assert policy.level(a, _Ep("e1", user_created=False)) == CAN_QUERY  # pay-per-token
    perms.set_grants("e1", {alice.id: CAN_MANAGE}, replace=False)
    d.refresh()
    assert d.grants("e1") == {outer.id: CAN_VIEW, alice.id: CAN_MANAGE}
    perms.set_grants("e1", {}, replace=True)
    d.refresh()
    assert d.grants("e1") == {}

    store.update(alice.id, USER, active=False)
    d.refresh()
    assert d.principal(alice.id) is None  # inactive: cannot authenticate
    with pytest.raises(InvalidParameterValue):
        store.delete(d.builtin_group("users") or "", GROUP)
    store.delete(inner.id, GROUP)
    d.refresh()
    assert d.members(outer.id) == (bot.id,)


def test_service_principal_secrets(db: Database) -> None:  # noqa: F811
    store = PrincipalStore(db)
    store.ensure_builtins("root@example.com")
    bot = store.create(SERVICE_PRINCIPAL, None, display_name="bot")
    creds = CredentialStore(db)
    value, info = creds.create_secret(bot.id, lifetime_s=3600)
    assert value.startswith("dose") and info.status == "ACTIVE"
    assert creds.verify_secret(bot.id, value) == info
    assert creds.verify_secret(bot.id, value + "x") is None
    assert creds.verify_secret("other", value) is None
    with db.engine.connect() as conn:  # only the hash is stored
        stored = " ".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM sp_secrets"))
    assert value not in stored
    d = Directory(store)
    d.refresh()
    assert d.secret_live(info.id, bot.id)
    short, sinfo = creds.create_secret(bot.id, lifetime_s=1)
    time.sleep(1.1)
    assert creds.verify_secret(bot.id, short) is None  # expired
    d.refresh()
    assert not d.secret_live(sinfo.id, bot.id)
    assert creds.delete_secret(bot.id, info.id) and not creds.delete_secret(bot.id, info.id)
    d.refresh()
    assert not d.secret_live(info.id, bot.id)
    store.delete(bot.id, SERVICE_PRINCIPAL)  # secrets go with the service principal
    assert creds.secrets(bot.id) == []
