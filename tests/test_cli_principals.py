"""``fmserve users|service-principals|groups``, run as a user runs them, against a real
``fmserve serve --no-bundled`` (the SCIM API, governance spec §4.3)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Server, fmserve_cmd, gateway_server

SCIM = "/api/2.0/preview/scim/v2"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with gateway_server("fmserve-cli-principals-") as s:
        yield s


def cli(srv: Server, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABRICKS_HOST": srv.url,
           "DATABRICKS_TOKEN": srv.token if token is None else token, "COLUMNS": "250"}
    return subprocess.run(fmserve_cmd() + list(args), capture_output=True, text=True, env=env,
                          timeout=120)


def ok(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    run = cli(srv, *args)
    assert run.returncode == 0, run.stderr
    return run


def scim(srv: Server, path: str, **params: Any) -> Any:
    with srv.client() as c:
        r = c.get(SCIM + path, params=params)
        assert r.status_code == 200, r.text
        return r.json()


def test_users_and_groups(srv: Server) -> None:
    t = uuid.uuid4().hex[:8]
    name = f"erin-{t}@example.com"
    made = ok(srv, "users", "create", name, "--display-name", f"Erin {t}")
    uid = made.stdout.strip().splitlines()[-1]
    assert uid.isdigit() and uid in made.stderr
    assert scim(srv, f"/Users/{uid}")["userName"] == name

    listed = ok(srv, "users", "list").stdout
    assert name in listed and f"Erin {t}" in listed and uid in listed
    assert "admin@fmserve.local" in listed
    filtered = ok(srv, "users", "list", "--filter", f'userName eq "{name}"').stdout
    assert name in filtered and "admin@fmserve.local" not in filtered
    shown = ok(srv, "users", "get", name).stdout
    assert uid in shown and f"Erin {t}" in shown and "users" in shown

    group = ok(srv, "groups", "create", f"ml-{t}", "--member", name)
    gid = group.stdout.strip().splitlines()[-1]
    assert [m["value"] for m in scim(srv, f"/Groups/{gid}")["members"]] == [uid]
    assert f"ml-{t}" in ok(srv, "groups", "list").stdout

    # add-member by names: a user to admins (now an admin), a group into a group.
    ok(srv, "groups", "add-member", "admins", name)
    assert uid in {m["value"] for m in scim(srv, "/Groups", filter='displayName eq "admins"')[
        "Resources"][0]["members"]}
    assert "admins" in ok(srv, "users", "get", uid).stdout
    ok(srv, "groups", "create", f"parent-{t}")
    ok(srv, "groups", "add-member", f"parent-{t}", f"ml-{t}")
    parents = scim(srv, f"/Groups/{gid}")["groups"]
    assert [p["display"] for p in parents] == [f"parent-{t}"]
    ok(srv, "groups", "remove-member", "admins", uid)
    assert "admins" not in ok(srv, "users", "get", uid).stdout
    missing = cli(srv, "groups", "remove-member", "admins", uid)
    assert missing.returncode == 1 and "not a member" in missing.stderr

    # Errors: one line, exit 1, the server's SCIM detail.
    dup = cli(srv, "users", "create", name)
    assert dup.returncode == 1 and "409" in dup.stderr and "uniqueness" in dup.stderr
    assert "already exists" in dup.stderr and "Traceback" not in dup.stderr
    nobody = cli(srv, "groups", "add-member", f"ml-{t}", f"nobody-{t}@example.com")
    assert nobody.returncode == 1 and f"nobody-{t}@example.com" in nobody.stderr
    builtin = cli(srv, "groups", "delete", "users")
    assert builtin.returncode == 1 and "400" in builtin.stderr and "built-in" in builtin.stderr
    bad = cli(srv, "users", "list", "--filter", "userName eq")
    assert bad.returncode == 1 and "invalidFilter" in bad.stderr

    ok(srv, "groups", "delete", f"ml-{t}")
    assert not scim(srv, "/Groups", filter=f'displayName eq "ml-{t}"')["Resources"]
    ok(srv, "users", "delete", name)
    assert cli(srv, "users", "get", uid).returncode == 1
    assert name not in ok(srv, "users", "list").stdout


def test_service_principals(srv: Server) -> None:
    t = uuid.uuid4().hex[:8]
    made = ok(srv, "service-principals", "create", f"etl bot {t}")
    sp_id, app_id = made.stdout.strip().splitlines()[-2:]
    assert str(uuid.UUID(app_id)) == app_id
    got = scim(srv, f"/ServicePrincipals/{sp_id}")
    assert (got["applicationId"], got["displayName"]) == (app_id, f"etl bot {t}")
    listed = ok(srv, "service-principals", "list").stdout
    assert app_id in listed and f"etl bot {t}" in listed
    assert sp_id in ok(srv, "service-principals", "get", app_id).stdout
    ok(srv, "groups", "create", f"ops-{t}")
    ok(srv, "groups", "add-member", f"ops-{t}", f"etl bot {t}")  # by its display name
    assert f"ops-{t}" in {g["display"] for g in scim(srv, f"/ServicePrincipals/{sp_id}")[
        "groups"]}
    ok(srv, "groups", "remove-member", f"ops-{t}", app_id)
    assert not scim(srv, "/Groups", filter=f'displayName eq "ops-{t}"')["Resources"][0][
        "members"]
    given = str(uuid.uuid4())
    ok(srv, "service-principals", "create", f"fixed {t}", "--application-id", given,
       "--group", "admins")
    fixed = scim(srv, "/ServicePrincipals", filter=f'applicationId eq "{given}"')["Resources"]
    assert [g["display"] for g in fixed[0]["groups"]] == ["admins", "users"]
    bad = cli(srv, "service-principals", "create", "x", "--application-id", "nope")
    assert bad.returncode == 1 and "UUID" in bad.stderr
    ok(srv, "service-principals", "delete", app_id)
    assert not scim(srv, "/ServicePrincipals", filter=f'applicationId eq "{app_id}"')[
        "Resources"]


def test_non_admin_and_no_token(srv: Server) -> None:
    from fmserve.config import ServerConfig
    from fmserve.store.db import open_database
    from fmserve.store.tokens import TokenStore

    t = uuid.uuid4().hex[:8]
    uid = ok(srv, "users", "create", f"frank-{t}@example.com").stdout.strip().splitlines()[-1]
    db = open_database(ServerConfig(data_dir=srv.data_dir))
    try:
        token = TokenStore(db).create(owner_id=uid)[0]
    finally:
        db.close()
    assert f"frank-{t}@example.com" in cli(srv, "users", "list", token=token).stdout
    denied = cli(srv, "groups", "create", f"g-{t}", token=token)
    assert denied.returncode == 1 and "403" in denied.stderr and "admins" in denied.stderr
    assert not scim(srv, "/Groups", filter=f'displayName eq "g-{t}"')["Resources"]
    none = cli(srv, "users", "list", token="")
    assert none.returncode == 2 and "token" in none.stderr.lower()
    down = subprocess.run(fmserve_cmd() + ["users", "list"], capture_output=True, text=True,
                          env={**os.environ, "DATABRICKS_HOST": "http://127.0.0.1:9",
                               "DATABRICKS_TOKEN": "dapi0"}, timeout=60)
    assert down.returncode == 1 and "fmserve serve" in down.stderr
    assert httpx.get(f"{srv.url}/health").status_code == 200
