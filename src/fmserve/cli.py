"""``fmserve`` command line: serve, admin-token, tokens, users, service-principals,
groups, secrets, endpoints, query.

``serve``, ``admin-token`` and ``secrets`` work on the data dir directly; the others are
thin clients of the HTTP API (``DATABRICKS_HOST`` / ``DATABRICKS_TOKEN``, or ``--host`` /
``--token``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fmserve import cli_principals, cli_tables, cli_tokens, cli_usage
from fmserve.cli_common import DEFAULT_HOST, DataDir, DbUrl, Host, Token, console, err
from fmserve.cli_common import call as _call
from fmserve.cli_common import client as _client
from fmserve.cli_common import ms as _ms
from fmserve.client import Client
from fmserve.config import ServerConfig, default_data_dir

app = typer.Typer(help="fmserve: self-hosted foundation model serving.", no_args_is_help=True,
                  add_completion=False)
endpoints_app = typer.Typer(help="Serving endpoints.", no_args_is_help=True)
app.add_typer(cli_tokens.app, name="tokens")
app.command("usage")(cli_usage.usage)
app.add_typer(cli_tables.app, name="tables")
app.add_typer(cli_principals.users_app, name="users")
app.add_typer(cli_principals.sps_app, name="service-principals")
app.add_typer(cli_principals.groups_app, name="groups")
app.add_typer(endpoints_app, name="endpoints")
secrets_app = typer.Typer(help="Secret scopes and secrets (values stored encrypted; never "
                          "shown).", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")



def _bootstrap(cfg: ServerConfig, *, force_token: bool, comment: str) -> str | None:
    """Creates the built-in groups and the first admin (``cfg.admin_user``) when missing;
    returns a new PAT of the first admin when one was just created or ``force_token``."""
    from fmserve.store.db import open_database
    from fmserve.store.principals import PrincipalStore
    from fmserve.store.tokens import TokenStore

    db = open_database(cfg)
    try:
        admin_id, created = PrincipalStore(db).ensure_builtins(cfg.admin_user)
        tokens = TokenStore(db)
        if created or force_token or tokens.count_active() == 0:
            return tokens.create(owner_id=admin_id, comment=comment)[0]
        return None
    finally:
        db.close()


@app.command("admin-token")
def admin_token(
    comment: Annotated[str, typer.Option(help="What the token is for.")] = "admin token",
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a personal access token for the first admin, directly in the data dir (for
    scripted set-up and recovery; needs access to the server's data dir or database).
    The token is the last line of stdout."""
    cfg = ServerConfig(data_dir=data_dir or default_data_dir(), database_url=database_url)
    token = _bootstrap(cfg, force_token=True, comment=comment)
    err.print(f"Created a token for {cfg.admin_user}. Store it now; it cannot be shown "
              "again.", highlight=False)
    print(token)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning.")] = "info",
    bundled: Annotated[bool, typer.Option(
        help="Serve the bundled pay-per-token models (--no-bundled: a gateway for external "
             "models and user endpoints only; no model is loaded).")] = True,
    access_log: Annotated[bool, typer.Option(
        help="Log one line per HTTP request (costs CPU on every request).")] = False,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", envvar="FMSERVE_REDIS_URL",
        help="Redis for rate-limit counters shared by replicas (default: in this "
             "process).")] = None,
) -> None:
    """Start the server with the bundled pay-per-token endpoints."""
    import uvicorn

    from fmserve.api.app import create_app

    cfg = ServerConfig(host=host, port=port, data_dir=data_dir or default_data_dir(),
                       database_url=database_url, bundled=bundled)
    if redis_url:
        cfg.redis_url = redis_url
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    token = _bootstrap(cfg, force_token=False,
                       comment="admin token created by first 'fmserve serve'")
    if token:
        console.print(f"[bold]The first admin ({cfg.admin_user}) was created with an access "
                      "token. It is shown only once:[/bold]", highlight=False)
        console.print(f"  export DATABRICKS_TOKEN={token}", soft_wrap=True, highlight=False)
    console.print(f"Data dir: {cfg.data_dir}.  Loading models, then serving on "
                  f"http://{host}:{port} ...", highlight=False)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=5, access_log=access_log)


def _secret_store(data_dir: Path | None, database_url: str | None):  # type: ignore[no-untyped-def]
    from fmserve.store.db import open_database
    from fmserve.store.secrets import SecretStore, load_key

    cfg = ServerConfig(data_dir=data_dir or default_data_dir(), database_url=database_url)
    try:
        return SecretStore(open_database(cfg), load_key(cfg.data_dir))
    except ValueError as exc:  # a bad FMSERVE_SECRETS_KEY
        err.print(str(exc))
        raise typer.Exit(2) from None


def _secrets_call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with store errors printed as one line (exit 1)."""
    from fmserve.errors import FmserveError, ResourceDoesNotExist

    try:
        return fn(*args)
    except ResourceDoesNotExist as exc:
        hint = (f" Create it first: 'fmserve secrets create-scope {args[0]}'."
                if "Scope" in exc.message else "")
        err.print(f"[red]{exc.error_code}[/red] {exc.message}{hint}", highlight=False)
    except FmserveError as exc:
        err.print(f"[red]{exc.error_code}[/red] {exc.message}", highlight=False)
    raise typer.Exit(1)


@secrets_app.command("create-scope")
def secrets_create_scope(scope: str, data_dir: DataDir = None,
                         database_url: DbUrl = None) -> None:
    """Create a secret scope."""
    _secrets_call(_secret_store(data_dir, database_url).create_scope, scope)
    err.print(f"Created scope {scope}.", highlight=False)


@secrets_app.command("list-scopes")
def secrets_list_scopes(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List secret scopes."""
    table = Table("scope", "backend_type")
    for name in _secret_store(data_dir, database_url).list_scopes():
        table.add_row(name, "DATABRICKS")
    console.print(table)


@secrets_app.command("delete-scope")
def secrets_delete_scope(scope: str, data_dir: DataDir = None,
                         database_url: DbUrl = None) -> None:
    """Delete a scope and every secret in it."""
    _secrets_call(_secret_store(data_dir, database_url).delete_scope, scope)
    err.print(f"Deleted scope {scope}.", highlight=False)


def _read_value(value: str | None) -> str:
    import sys

    if value is not None:
        return value
    if not sys.stdin.isatty():
        text = sys.stdin.read()
        return text[:-1] if text.endswith("\n") else text  # `echo` adds one newline
    return str(typer.prompt("Secret value", hide_input=True))


@secrets_app.command("put")
def secrets_put(
    scope: str,
    key: str,
    value: Annotated[str | None, typer.Option(
        "--value", "--string-value", help="The value (else read from stdin when piped, "
        "else a hidden prompt). It lands in your shell history: prefer stdin.")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create or overwrite a secret; use it as {{secrets/SCOPE/KEY}} in endpoint configs."""
    store = _secret_store(data_dir, database_url)
    text = _read_value(value)
    if not text:
        err.print("Empty value: nothing stored.")
        raise typer.Exit(2)
    _secrets_call(store.put, scope, key, text)
    err.print(f"Stored secret {key} in scope {scope}; reference it as "
              f"{{{{secrets/{scope}/{key}}}}}.", highlight=False)


@secrets_app.command("list")
def secrets_list(scope: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List the keys of a scope (never values)."""
    table = Table("key", "last updated")
    for m in _secrets_call(_secret_store(data_dir, database_url).list, scope):
        table.add_row(m.key, _ms(m.last_updated_timestamp))
    console.print(table)


@secrets_app.command("delete")
def secrets_delete(scope: str, key: str, data_dir: DataDir = None,
                   database_url: DbUrl = None) -> None:
    """Delete one secret."""
    _secrets_call(_secret_store(data_dir, database_url).delete, scope, key)
    err.print(f"Deleted secret {key} from scope {scope}.", highlight=False)


@endpoints_app.command("list")
def endpoints_list(host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """List serving endpoints."""
    with _client(host, token) as c:
        body = _call(c, "GET", "/api/2.0/serving-endpoints")
    table = Table("name", "task", "state", "served entities")
    for ep in body.get("endpoints", []):
        entities = ", ".join(e.get("entity_name") or e["name"]
                             for e in ep.get("config", {}).get("served_entities", []))
        table.add_row(ep["name"], ep.get("task", ""), ep["state"]["ready"], entities)
    console.print(table)


def _load_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        err.print(f"Cannot read {path}: {exc}")
        raise typer.Exit(2) from None


def _wait_deployed(c: Client, name: str, timeout_s: float = 1200) -> dict[str, Any]:
    """Polls the endpoint while its config rolls out, showing entity states."""
    import time

    deadline = time.monotonic() + timeout_s
    with console.status(f"Deploying {name} ...") as status:
        while True:
            ep = _call(c, "GET", f"/api/2.0/serving-endpoints/{name}")
            if ep["state"]["config_update"] != "IN_PROGRESS" or time.monotonic() > deadline:
                return ep  # type: ignore[no-any-return]
            pending = (ep.get("pending_config") or {}).get("served_entities", [])
            states = ", ".join(f"{e['name']}: {e.get('state', {}).get('deployment', '?')}"
                               for e in pending)
            status.update(f"Deploying {name} ... {states}")
            time.sleep(0.5)


def _show(ep: dict[str, Any]) -> None:
    table = Table("served entity", "entity_name", "version", "traffic %", "state", "message",
                  title=f"{ep['name']}  ({ep.get('task', '')})  ready={ep['state']['ready']}  "
                        f"config_update={ep['state']['config_update']}")
    routes = {r.get("served_entity_name") or r.get("served_model_name"): r["traffic_percentage"]
              for r in (ep.get("config") or {}).get("traffic_config", {}).get("routes", [])}
    for source in ("config", "pending_config"):
        for e in (ep.get(source) or {}).get("served_entities", []):
            st = e.get("state", {})
            table.add_row(e["name"] + (" (pending)" if source == "pending_config" else ""),
                          e.get("entity_name", ""), str(e.get("entity_version", "")),
                          str(routes.get(e["name"], "")), st.get("deployment", ""),
                          st.get("deployment_state_message", ""))
    console.print(table)


EndpointFile = Annotated[Path, typer.Option("--file", "-f", exists=True, dir_okay=False,
                                            help="JSON body as the REST API takes it.")]


@endpoints_app.command("create")
def endpoints_create(file: EndpointFile, host: Host = DEFAULT_HOST, token: Token = None,
                     no_wait: Annotated[bool, typer.Option(help="Return at once.")] = False
                     ) -> None:
    """Create an endpoint from a JSON file (the body of POST /api/2.0/serving-endpoints)."""
    body = _load_json(file)
    with _client(host, token) as c:
        ep = _call(c, "POST", "/api/2.0/serving-endpoints", json=body)
        if not no_wait:
            ep = _wait_deployed(c, ep["name"])
    _show(ep)
    if ep["state"]["config_update"] == "UPDATE_FAILED":
        raise typer.Exit(1)


@endpoints_app.command("update-config")
def endpoints_update_config(name: str, file: EndpointFile, host: Host = DEFAULT_HOST,
                            token: Token = None,
                            no_wait: Annotated[bool, typer.Option(help="Return at once.")] = False
                            ) -> None:
    """Roll out a new config (the body of PUT /api/2.0/serving-endpoints/NAME/config)."""
    body = _load_json(file)
    with _client(host, token) as c:
        ep = _call(c, "PUT", f"/api/2.0/serving-endpoints/{name}/config", json=body)
        if not no_wait:
            ep = _wait_deployed(c, name)
    _show(ep)
    if ep["state"]["config_update"] == "UPDATE_FAILED":
        raise typer.Exit(1)


@endpoints_app.command("get")
def endpoints_get(name: str, host: Host = DEFAULT_HOST, token: Token = None,
                  as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False
                  ) -> None:
    """Show one endpoint."""
    with _client(host, token) as c:
        ep = _call(c, "GET", f"/api/2.0/serving-endpoints/{name}")
    if as_json:
        console.print_json(data=ep)
    else:
        _show(ep)


@endpoints_app.command("delete")
def endpoints_delete(name: str, host: Host = DEFAULT_HOST, token: Token = None) -> None:
    """Delete an endpoint and stop its workers."""
    with _client(host, token) as c:
        _call(c, "DELETE", f"/api/2.0/serving-endpoints/{name}")
    err.print(f"Deleted {name}.")


@app.command()
def query(
    endpoint: str,
    prompt: str,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate (chat).")] = 256,
    temperature: Annotated[float, typer.Option(help="0.0-2.0 (chat).")] = 0.7,
    host: Host = DEFAULT_HOST,
    token: Token = None,
) -> None:
    """Query an endpoint: chat for chat endpoints, an embedding for embeddings endpoints."""
    with _client(host, token) as c:
        ep = _call(c, "GET", f"/api/2.0/serving-endpoints/{endpoint}")
        if ep.get("task") == "llm/v1/embeddings":
            body = _call(c, "POST", f"/serving-endpoints/{endpoint}/invocations",
                         json={"input": prompt})
            vec = body["data"][0]["embedding"]
            table = Table("dimensions", "first values", "prompt tokens")
            table.add_row(str(len(vec)), ", ".join(f"{v:.4f}" for v in vec[:6]) + ", ...",
                          str(body["usage"]["prompt_tokens"]))
            console.print(table)
            return
        body = _call(c, "POST", f"/serving-endpoints/{endpoint}/invocations",
                     json={"messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature})
    console.print(body["choices"][0]["message"]["content"], highlight=False)
    u = body["usage"]
    err.print(f"[dim]{endpoint}: {u['prompt_tokens']} prompt + {u['completion_tokens']} "
              f"completion tokens, finish_reason={body['choices'][0]['finish_reason']}[/dim]")
