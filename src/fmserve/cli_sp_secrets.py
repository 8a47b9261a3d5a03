"""``fmserve service-principals secrets``: OAuth client secrets of service principals, a
client of ``/api/2.0/accounts/servicePrincipals/{id}/credentials/secrets`` (governance
spec §4.4; workspace admins only).

``SP`` is the service principal's numeric id, its ``applicationId`` (the OAuth
``client_id``) or a display name only one has, resolved through SCIM. ``create`` prints
the client_id and then the secret on stdout (the secret is the last line, for scripts:
``fmserve service-principals secrets create ci | tail -1``); it is shown once. Errors
are one line on stderr and exit 1; no token: exit 2.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from fmserve.cli_common import DEFAULT_HOST, Host, Token, call, client, console, err
from fmserve.client import ApiUnreachable, Client

app = typer.Typer(help="OAuth client secrets (client_id = the applicationId).",
                  no_args_is_help=True)

SCIM_SPS = "/api/2.0/preview/scim/v2/ServicePrincipals"
Sp = Annotated[str, typer.Argument(help="Service principal: id, applicationId or display "
                                   "name.", show_default=False)]


def _path(sp_id: str) -> str:
    return f"/api/2.0/accounts/servicePrincipals/{sp_id}/credentials/secrets"


def _search(c: Client, attr: str, value: str) -> list[dict[str, Any]]:
    body = call(c, "GET", SCIM_SPS, params={"filter": f"{attr} eq {json.dumps(value)}",
                                            "startIndex": 1, "count": 2})
    return list(body.get("Resources") or [])


def resolve_sp(c: Client, ref: str) -> dict[str, Any]:
    """The SCIM ServicePrincipal named ``ref`` (id, applicationId or a unique display
    name); exits 1 when there is none or the name is ambiguous."""
    if ref.isdigit():
        try:
            r = c.send("GET", f"{SCIM_SPS}/{ref}")
        except ApiUnreachable as exc:
            err.print(f"{exc}. Is 'fmserve serve' running?")
            raise typer.Exit(1) from None
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        if r.status_code != 404:
            call(c, "GET", f"{SCIM_SPS}/{ref}")  # prints the error and exits
    found = _search(c, "applicationId", ref) or _search(c, "displayName", ref)
    if len(found) > 1:
        err.print(f"Several service principals are named '{ref}'; use the applicationId "
                  "or id.", highlight=False)
        raise typer.Exit(1)
    if not found:
        err.print(f"No service principal '{ref}'.", highlight=False)
        raise typer.Exit(1)
    return found[0]


def _when(value: str | None) -> str:
    """An RFC 3339 UTC time as local ``YYYY-mm-dd HH:MM:SS``."""
    if not value:
        return "never"
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


@app.command("create")
def create(
    sp: Sp,
    lifetime_seconds: Annotated[int | None, typer.Option(
        "--lifetime-seconds", min=1, help="Lifetime in seconds (default and most: 730 "
        "days).")] = None,
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="Bind the secret to these scopes (repeatable; must include "
        "all-apis). Default: unrestricted.")] = None,
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """Create a client secret; prints the client_id, then the secret (shown once)."""
    body: dict[str, Any] = {}
    if lifetime_seconds is not None:
        body["lifetime"] = f"{lifetime_seconds}s"
    if scope:
        body["scopes"] = scope
    with client(host, token) as c:
        rec = resolve_sp(c, sp)
        res = call(c, "POST", _path(rec["id"]), json=body)
    err.print(f"Created secret {res['id']} for service principal "
              f"{rec.get('displayName', '')} (id {rec['id']}), expiring "
              f"{_when(res.get('expire_time'))}. client_id, then client_secret — the secret "
              "is shown only once: store it now.", highlight=False)
    print(rec["applicationId"])
    print(res["secret"])


@app.command("list")
def list_(
    sp: Sp,
    as_json: Annotated[bool, typer.Option("--json", help="Print the SecretInfo list as "
                                          "JSON.")] = False,
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """List a service principal's secrets (never their values)."""
    with client(host, token) as c:
        rec = resolve_sp(c, sp)
        secrets: list[dict[str, Any]] = []
        params: dict[str, Any] = {"page_size": 100}
        while True:
            page = call(c, "GET", _path(rec["id"]), params=params)
            secrets.extend(page.get("secrets") or [])
            if not page.get("next_page_token"):
                break
            params["page_token"] = page["next_page_token"]
    if as_json:
        print(json.dumps(secrets, indent=2))
        return
    table = Table(title=f"client_id {rec['applicationId']}")
    table.add_column("id", no_wrap=True)
    for col in ("status", "secret hash", "created", "expires", "scopes"):
        table.add_column(col)
    for s in secrets:
        table.add_row(s["id"], s.get("status", ""), s.get("secret_hash", ""),
                      _when(s.get("create_time")), _when(s.get("expire_time")),
                      " ".join(s.get("scopes") or []) or "all-apis")
    console.print(table)


@app.command("delete")
def delete(
    sp: Sp,
    secret_id: Annotated[str, typer.Argument(help="The secret's id (from 'list').",
                                             show_default=False)],
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """Delete a secret; the access tokens minted with it stop working."""
    with client(host, token) as c:
        rec = resolve_sp(c, sp)
        call(c, "DELETE", f"{_path(rec['id'])}/{secret_id}")
    err.print(f"Deleted secret {secret_id} of service principal {rec['applicationId']}.",
              highlight=False)
