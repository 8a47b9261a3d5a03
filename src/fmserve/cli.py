"""``fmserve`` command line: serve, tokens, secrets, endpoints, query.

``serve``, ``tokens`` and ``secrets`` work on the data dir directly; ``endpoints`` and
``query`` are thin clients of the HTTP API (``DATABRICKS_HOST`` /
``DATABRICKS_TOKEN``, or ``--host`` / ``--token``).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fmserve.client import ApiError, ApiUnreachable, Client, resolve
from fmserve.config import ServerConfig, default_data_dir

app = typer.Typer(help="fmserve: self-hosted foundation model serving.", no_args_is_help=True,
                  add_completion=False)
tokens_app = typer.Typer(help="Personal access tokens.", no_args_is_help=True)
endpoints_app = typer.Typer(help="Serving endpoints.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
app.add_typer(endpoints_app, name="endpoints")
secrets_app = typer.Typer(help="Secret scopes and secrets (values stored encrypted; never "
                          "shown).", no_args_is_help=True)
app.add_typer(secrets_app, name="secrets")

console = Console()
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data dir (default "
                                              "$FMSERVE_HOME or ~/.fmserve).")]
DbUrl = Annotated[str | None, typer.Option("--database-url", envvar="FMSERVE_DATABASE_URL",
                                           help="SQLAlchemy URL (default SQLite in data dir).")]
Host = Annotated[str, typer.Option("--host", envvar="DATABRICKS_HOST",
                                   help="Server URL.")]
Token = Annotated[str | None, typer.Option("--token", envvar="DATABRICKS_TOKEN",
                                           help="Access token.")]


def _token_store(data_dir: Path | None, database_url: str | None):  # type: ignore[no-untyped-def]
    from fmserve.store.db import open_database
    from fmserve.store.tokens import TokenStore

    cfg = ServerConfig(data_dir=data_dir or default_data_dir(), database_url=database_url)
    return TokenStore(open_database(cfg))


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
) -> None:
    """Start the server with the bundled pay-per-token endpoints."""
    import uvicorn

    from fmserve.api.app import create_app

    cfg = ServerConfig(host=host, port=port, data_dir=data_dir or default_data_dir(),
                       database_url=database_url, bundled=bundled)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    store = _token_store(cfg.data_dir, cfg.database_url)
    if store.count_active() == 0:
        token, _ = store.create(comment="admin token created by first 'fmserve serve'",
                                owner="admin", is_admin=True)
        console.print("[bold]No access token existed, so an admin token was created. "
                      "It is shown only once:[/bold]")
        console.print(f"  export DATABRICKS_TOKEN={token}", soft_wrap=True, highlight=False)
    store.db.close()
    console.print(f"Data dir: {cfg.data_dir}.  Loading models, then serving on "
                  f"http://{host}:{port} ...", highlight=False)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level.lower(),
                timeout_graceful_shutdown=5, access_log=access_log)


@tokens_app.command("create")
def tokens_create(
    comment: Annotated[str, typer.Option(help="What the token is for.")] = "",
    lifetime_seconds: Annotated[int | None, typer.Option(help="Expire after this long.")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a token; the token is the last line of stdout."""
    token, info = _token_store(data_dir, database_url).create(
        comment=comment, owner="admin", is_admin=True, lifetime_s=lifetime_seconds)
    err.print(f"Created token {info.token_id}. Store it now; it cannot be shown again.")
    print(token)


@tokens_app.command("list")
def tokens_list(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """List tokens (ids and comments; never the tokens themselves)."""
    table = Table("token_id", "comment", "owner", "created", "expires", "state")
    for t in _token_store(data_dir, database_url).list():
        table.add_row(t.token_id, t.comment, t.owner, _ms(t.creation_time),
                      "never" if t.expiry_time == -1 else _ms(t.expiry_time),
                      "revoked" if t.revoked else "active")
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Revoke a token by id."""
    if not _token_store(data_dir, database_url).revoke(token_id):
        err.print(f"No token with id {token_id!r} - see 'fmserve tokens list'.")
        raise typer.Exit(1)
    err.print(f"Revoked {token_id}.")


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


def _ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _client(host: str, token: str | None) -> Client:
    if not token:
        err.print("No token: pass --token or export DATABRICKS_TOKEN "
                  "(create one with 'fmserve tokens create').")
        raise typer.Exit(2)
    return Client(host, token)


def _call(client: Client, method: str, path: str, **kw: Any) -> Any:
    try:
        return client.request(method, path, **kw)
    except ApiUnreachable as exc:
        err.print(f"{exc}. Is 'fmserve serve' running?")
        raise typer.Exit(1) from None
    except ApiError as exc:
        err.print(f"[red]HTTP {exc.status}[/red] {exc.error_code}: {exc.message}",
                  highlight=False)
        raise typer.Exit(1) from None


DEFAULT_HOST = resolve()[0]


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
