"""Test principals on a real server: users, groups and service principals made through the
SCIM API (as an admin would), each with a personal access token of its own.

Tokens for non-admins are minted straight in the server's data dir
(:class:`fmserve.store.tokens.TokenStore`, the table ``fmserve admin-token`` writes);
the server authenticates them like any PAT.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
from conftest import Server
from databricks.sdk import WorkspaceClient

from fmserve.config import ServerConfig
from fmserve.store.db import open_database
from fmserve.store.tokens import TokenStore

SCIM = "/api/2.0/preview/scim/v2"


def uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class Caller:
    """A user or service principal with a PAT; ``name`` is its userName/applicationId."""

    id: str
    kind: str  # "user" | "service_principal"
    name: str
    token: str
    url: str
    display_name: str = ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.token}"})

    def ws(self) -> WorkspaceClient:
        return WorkspaceClient(host=self.url, token=self.token)


def scim_create(srv: Server, resource: str, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/2.0/preview/scim/v2/{resource}`` as the first admin; the new resource."""
    with srv.client() as c:
        r = c.post(f"{SCIM}/{resource}", json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def mint_pat(srv: Server, owner_id: str) -> str:
    """A new PAT owned by ``owner_id``, written to the server's database."""
    db = open_database(ServerConfig(data_dir=srv.data_dir, database_url=None))
    try:
        token, _ = TokenStore(db).create(owner_id=owner_id, comment="test")
    finally:
        db.close()
    return token


def new_user(srv: Server, prefix: str = "u") -> Caller:
    name = f"{prefix}-{uid()}@example.com"
    rec = scim_create(srv, "Users", {"userName": name, "displayName": f"User {prefix}"})
    assert rec["userName"] == name
    return Caller(rec["id"], "user", name, mint_pat(srv, rec["id"]), srv.url,
                  rec["displayName"])


def new_sp(srv: Server, prefix: str = "sp") -> Caller:
    rec = scim_create(srv, "ServicePrincipals", {"displayName": f"{prefix}-{uid()}"})
    return Caller(rec["id"], "service_principal", rec["applicationId"],
                  mint_pat(srv, rec["id"]), srv.url, rec["displayName"])


def new_group(srv: Server, members: list[str], prefix: str = "g") -> dict[str, Any]:
    """A group of the principals with ids ``members``; the SCIM Group."""
    return scim_create(srv, "Groups", {"displayName": f"{prefix}-{uid()}",
                                       "members": [{"value": m} for m in members]})
