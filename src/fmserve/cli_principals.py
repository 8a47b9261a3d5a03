"""``fmserve users|service-principals|groups``: clients of the workspace SCIM API
(governance spec §4.3, ``/api/2.0/preview/scim/v2``).

Principals are named by id or by name wherever a command takes one: a user by its
``userName``, a service principal by its ``applicationId`` (or a display name only one
has), a group by its ``displayName`` (resolved with SCIM ``eq`` filters). ``create``
prints the new id on stdout (a service principal's applicationId on the next line);
errors are one line on stderr and exit 1.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from fmserve import cli_sp_secrets
from fmserve.cli_common import DEFAULT_HOST, Host, Token, client, console, err
from fmserve.client import ApiUnreachable, Client

users_app = typer.Typer(help="Users (SCIM).", no_args_is_help=True)
sps_app = typer.Typer(help="Service principals (SCIM) and their OAuth secrets.",
                      no_args_is_help=True)
groups_app = typer.Typer(help="Groups (SCIM) and their members.", no_args_is_help=True)
sps_app.add_typer(cli_sp_secrets.app, name="secrets")

SCIM = "/api/2.0/preview/scim/v2"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
_NAME = {"Users": "userName", "ServicePrincipals": "applicationId", "Groups": "displayName"}
_WHAT = {"Users": "user", "ServicePrincipals": "service principal", "Groups": "group"}

Filter = Annotated[str | None, typer.Option("--filter", help='SCIM filter, e.g. '
                                            "'displayName co \"ops\"'.")]
Groups = Annotated[list[str] | None, typer.Option("--group", "-g", help="A group (name or id) "
                                                  "to join; repeatable.")]


# -- HTTP --------------------------------------------------------------------------------
def _fail(r: httpx.Response) -> typer.Exit:
    try:
        body = r.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if "detail" in body:  # SCIM's error shape
        what, msg = body.get("scimType") or "", body.get("detail", "")
    else:
        what, msg = body.get("error_code", ""), body.get("message", r.text[:300])
    err.print(f"[red]HTTP {r.status_code}[/red] {what + ': ' if what else ''}{msg}",
              highlight=False)
    return typer.Exit(1)


def _send(c: Client, method: str, path: str, **kw: Any) -> httpx.Response:
    try:
        return c.send(method, SCIM + path, **kw)
    except ApiUnreachable as exc:
        err.print(f"{exc}. Is 'fmserve serve' running?")
        raise typer.Exit(1) from None


def _scim(c: Client, method: str, path: str, **kw: Any) -> Any:
    r = _send(c, method, path, **kw)
    if r.status_code >= 400:
        raise _fail(r)
    return r.json() if r.content else None


def _list(c: Client, rtype: str, flt: str | None = None) -> list[dict[str, Any]]:
    """Every resource (paging as databricks-sdk does, by ``startIndex``)."""
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"startIndex": 1, "count": 500}
    if flt:
        params["filter"] = flt
    while True:
        page = _scim(c, "GET", f"/{rtype}", params=params).get("Resources") or []
        out.extend(page)
        if not page:
            return out
        params["startIndex"] += len(page)


def _lookup(c: Client, rtype: str, ref: str) -> dict[str, Any] | None:
    """The ``rtype`` resource whose id or name is ``ref``, or None."""
    if ref.isdigit():
        r = _send(c, "GET", f"/{rtype}/{ref}")
        if r.status_code == 200:
            return r.json()  # type: ignore[no-any-return]
        if r.status_code != 404:
            raise _fail(r)
    found = _list(c, rtype, f"{_NAME[rtype]} eq {json.dumps(ref)}")
    if not found and rtype == "ServicePrincipals":  # also by a display name only one has
        found = _list(c, rtype, f"displayName eq {json.dumps(ref)}")
        if len(found) > 1:
            err.print(f"{len(found)} service principals are named '{ref}'; use the "
                      "applicationId or id.", highlight=False)
            raise typer.Exit(1)
    return found[0] if found else None


def _find(c: Client, rtype: str, ref: str) -> dict[str, Any]:
    res = _lookup(c, rtype, ref)
    if res is None:
        err.print(f"No {_WHAT[rtype]} '{ref}'.", highlight=False)
        raise typer.Exit(1)
    return res


def _find_member(c: Client, ref: str) -> dict[str, Any]:
    """A user, service principal or group by id or name (in that order)."""
    for rtype in _NAME:
        res = _lookup(c, rtype, ref)
        if res is not None:
            return res
    err.print(f"No user, service principal or group '{ref}'.", highlight=False)
    raise typer.Exit(1)


def _group_refs(c: Client, names: list[str] | None) -> list[dict[str, str]]:
    return [{"value": _find(c, "Groups", g)["id"]} for g in names or []]


# -- output ------------------------------------------------------------------------------
def _names(items: Any) -> str:
    if not isinstance(items, list):
        return ""
    return ", ".join(str(i.get("display") or i.get("value")) for i in items
                     if isinstance(i, dict))


def _table(rtype: str, resources: list[dict[str, Any]]) -> Table:
    if rtype == "Groups":
        table = Table("id", "name", "members", "groups")
        for g in resources:
            table.add_row(g["id"], g.get("displayName", ""), _names(g.get("members")),
                          _names(g.get("groups")))
        return table
    table = Table("id", "user name" if rtype == "Users" else "application id",
                  "display name", "active", "groups")
    for p in resources:
        table.add_row(p["id"], p.get(_NAME[rtype], ""), p.get("displayName", ""),
                      "yes" if p.get("active", True) else "no", _names(p.get("groups")))
    return table


def _show(res: dict[str, Any]) -> None:
    table = Table("attribute", "value", show_header=False)
    for key, value in res.items():
        if key in ("schemas", "meta"):
            continue
        if isinstance(value, list):
            text = _names(value) if all(isinstance(v, dict) for v in value) else ", ".join(
                map(str, value))
        elif isinstance(value, dict):
            text = " ".join(f"{k}={v}" for k, v in value.items())
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)


def _list_cmd(rtype: str, flt: str | None, host: str, token: str | None) -> None:
    with client(host, token) as c:
        console.print(_table(rtype, _list(c, rtype, flt)))


def _get_cmd(rtype: str, ref: str, host: str, token: str | None) -> None:
    with client(host, token) as c:
        _show(_find(c, rtype, ref))


def _delete_cmd(rtype: str, ref: str, host: str, token: str | None) -> None:
    with client(host, token) as c:
        res = _find(c, rtype, ref)
        _scim(c, "DELETE", f"/{rtype}/{res['id']}")
    err.print(f"Deleted {_WHAT[rtype]} {res.get(_NAME[rtype])} (id {res['id']}).",
              highlight=False)


def _created(rtype: str, res: dict[str, Any]) -> None:
    err.print(f"Created {_WHAT[rtype]} {res.get(_NAME[rtype])} (id {res['id']}).",
              highlight=False)
    print(res["id"])
    if rtype == "ServicePrincipals":
        print(res["applicationId"])


# -- users -------------------------------------------------------------------------------
@users_app.command("create")
def users_create(
    user_name: Annotated[str, typer.Argument(help="userName (an email).")],
    display_name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    group: Groups = None,
    admin: Annotated[bool, typer.Option("--admin", help="Also join 'admins'.")] = False,
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """Create a user; prints its id."""
    body: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                            "userName": user_name}
    if display_name:
        body["displayName"] = display_name
    with client(host, token) as c:
        groups = _group_refs(c, [*(group or []), *(["admins"] if admin else [])])
        if groups:
            body["groups"] = groups
        res = _scim(c, "POST", "/Users", json=body)
    _created("Users", res)


@users_app.command("list")
def users_list(filter: Filter = None, host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """List users."""
    _list_cmd("Users", filter, host, token)


@users_app.command("get")
def users_get(user: Annotated[str, typer.Argument(help="Id or userName.")],
              host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Show a user."""
    _get_cmd("Users", user, host, token)


@users_app.command("delete")
def users_delete(user: Annotated[str, typer.Argument(help="Id or userName.")],
                 host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Delete a user (its tokens stop working)."""
    _delete_cmd("Users", user, host, token)


# -- service principals --------------------------------------------------------------------
@sps_app.command("create")
def sps_create(
    display_name: Annotated[str, typer.Argument(help="Display name.")],
    application_id: Annotated[str | None, typer.Option(
        help="applicationId (a UUID; default: a new one).")] = None,
    group: Groups = None,
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """Create a service principal; prints its id, then its applicationId (the OAuth
    client_id)."""
    body: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:"
                                        "ServicePrincipal"], "displayName": display_name}
    if application_id:
        body["applicationId"] = application_id
    with client(host, token) as c:
        groups = _group_refs(c, group)
        if groups:
            body["groups"] = groups
        res = _scim(c, "POST", "/ServicePrincipals", json=body)
    _created("ServicePrincipals", res)


@sps_app.command("list")
def sps_list(filter: Filter = None, host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """List service principals."""
    _list_cmd("ServicePrincipals", filter, host, token)


@sps_app.command("get")
def sps_get(sp: Annotated[str, typer.Argument(help="Id or applicationId.")],
            host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Show a service principal."""
    _get_cmd("ServicePrincipals", sp, host, token)


@sps_app.command("delete")
def sps_delete(sp: Annotated[str, typer.Argument(help="Id or applicationId.")],
               host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Delete a service principal (its tokens and OAuth secrets stop working)."""
    _delete_cmd("ServicePrincipals", sp, host, token)


# -- groups --------------------------------------------------------------------------------
@groups_app.command("create")
def groups_create(
    name: Annotated[str, typer.Argument(help="displayName.")],
    member: Annotated[list[str] | None, typer.Option(
        "--member", "-m", help="A member (user name, application id, group name or id); "
        "repeatable.")] = None,
    host: Host = DEFAULT_HOST, token: Token = None,
) -> None:
    """Create a group; prints its id."""
    body: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                            "displayName": name}
    with client(host, token) as c:
        if member:
            body["members"] = [{"value": _find_member(c, m)["id"]} for m in member]
        res = _scim(c, "POST", "/Groups", json=body)
    _created("Groups", res)


@groups_app.command("list")
def groups_list(filter: Filter = None, host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """List groups with their members."""
    _list_cmd("Groups", filter, host, token)


@groups_app.command("get")
def groups_get(group: Annotated[str, typer.Argument(help="Id or name.")],
               host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Show a group."""
    _get_cmd("Groups", group, host, token)


@groups_app.command("delete")
def groups_delete(group: Annotated[str, typer.Argument(help="Id or name.")],
                  host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Delete a group (not 'admins' or 'users')."""
    _delete_cmd("Groups", group, host, token)


Member = Annotated[str, typer.Argument(help="User name, application id (or service "
                                        "principal display name), group name or id.")]
GroupRef = Annotated[str, typer.Argument(help="Group name or id.")]


@groups_app.command("add-member")
def groups_add_member(group: GroupRef, member: Member, host: Host = DEFAULT_HOST,
                      token: Token = None) -> None:
    """Add a user, service principal or group to a group ('admins' makes an admin)."""
    with client(host, token) as c:
        g, m = _find(c, "Groups", group), _find_member(c, member)
        _scim(c, "PATCH", f"/Groups/{g['id']}", json={"schemas": [PATCH_OP], "Operations": [
            {"op": "add", "value": {"members": [{"value": m["id"]}]}}]})
    err.print(f"Added {_label(m)} to {g['displayName']}.", highlight=False)


@groups_app.command("remove-member")
def groups_remove_member(group: GroupRef, member: Member, host: Host = DEFAULT_HOST,
                         token: Token = None) -> None:
    """Remove a member from a group."""
    with client(host, token) as c:
        g, m = _find(c, "Groups", group), _find_member(c, member)
        if m["id"] not in {i.get("value") for i in g.get("members", [])}:
            err.print(f"{_label(m)} is not a member of {g['displayName']}.", highlight=False)
            raise typer.Exit(1)
        _scim(c, "PATCH", f"/Groups/{g['id']}", json={"schemas": [PATCH_OP], "Operations": [
            {"op": "remove", "path": f"members[value eq {json.dumps(m['id'])}]"}]})
    err.print(f"Removed {_label(m)} from {g['displayName']}.", highlight=False)


def _label(res: dict[str, Any]) -> str:
    return str(res.get("userName") or res.get("applicationId") or res.get("displayName"))
