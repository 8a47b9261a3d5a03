"""``fmserve tokens``: personal access tokens, as a client of ``/api/2.0/token`` and (for
admins) ``/api/2.0/token-management``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fmserve.cli_common import DEFAULT_HOST, Host, Token, call, client, console, err, ms

app = typer.Typer(help="Personal access tokens (yours; admins: --all, --on-behalf-of).",
                  no_args_is_help=True)


@app.command("create")
def create(
    comment: Annotated[str, typer.Option(help="What the token is for.")] = "",
    lifetime_seconds: Annotated[int | None, typer.Option(
        help="Expire after this many seconds (default: two years).")] = None,
    on_behalf_of: Annotated[str | None, typer.Option(
        "--on-behalf-of", help="Admins: a token of the service principal with this "
        "application id.")] = None,
    host: Host = DEFAULT_HOST,
    token: Token = None,
) -> None:
    """Create a token; the token is the last line of stdout."""
    body: dict[str, object] = {"comment": comment}
    if lifetime_seconds is not None:
        body["lifetime_seconds"] = lifetime_seconds
    with client(host, token) as c:
        if on_behalf_of:
            out = call(c, "POST", "/api/2.0/token-management/on-behalf-of/tokens",
                       json={**body, "application_id": on_behalf_of})
        else:
            out = call(c, "POST", "/api/2.0/token/create", json=body)
    err.print(f"Created token {out['token_info']['token_id']}. Store it now; it cannot be "
              "shown again.", highlight=False)
    print(out["token_value"])


@app.command("list")
def list_tokens(
    all_: Annotated[bool, typer.Option("--all", help="Admins: every principal's tokens.")]
    = False,
    host: Host = DEFAULT_HOST,
    token: Token = None,
) -> None:
    """List tokens (ids and comments; never the tokens themselves)."""
    with client(host, token) as c:
        path = "/api/2.0/token-management/tokens" if all_ else "/api/2.0/token/list"
        infos = call(c, "GET", path).get("token_infos") or []
    table = Table("token_id", "comment", *(["owner", "created by"] if all_ else []),
                  "created", "expires")
    for t in infos:
        owner = [str(t.get("owner_id", "")), t.get("created_by_username", "")] if all_ else []
        table.add_row(t["token_id"], t.get("comment", ""), *owner, ms(t.get("creation_time")),
                      ms(t.get("expiry_time")))
    console.print(table)


@app.command("delete")
def delete(
    token_id: str,
    host: Host = DEFAULT_HOST,
    token: Token = None,
) -> None:
    """Delete (revoke) a token by id: yours, or any token for an admin."""
    with client(host, token) as c:
        mine = {t["token_id"] for t in call(c, "GET", "/api/2.0/token/list")
                .get("token_infos") or []}
        if token_id in mine:
            call(c, "POST", "/api/2.0/token/delete", json={"token_id": token_id})
        else:
            call(c, "DELETE", f"/api/2.0/token-management/tokens/{token_id}")
    err.print(f"Deleted token {token_id}.", highlight=False)


app.command("revoke", help="Same as delete.")(delete)
