"""What every ``fmserve`` command module shares: consoles, option types, the API client
helpers (one line of error per failure, exit 1; no token: exit 2)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fmserve.client import ApiError, ApiUnreachable, Client, resolve

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

DEFAULT_HOST = resolve()[0]


def ms(value: int | None) -> str:
    """An epoch-ms timestamp as local ``YYYY-mm-dd HH:MM:SS`` (``never`` for None / -1)."""
    if value is None or value < 0:
        return "never"
    return dt.datetime.fromtimestamp(value / 1000).strftime("%Y-%m-%d %H:%M:%S")


def client(host: str, token: str | None) -> Client:
    if not token:
        err.print("No token: pass --token or export DATABRICKS_TOKEN "
                  "(create one with 'fmserve tokens create', or 'fmserve admin-token' on "
                  "the server's machine).")
        raise typer.Exit(2)
    return Client(host, token)


def call(c: Client, method: str, path: str, **kw: Any) -> Any:
    try:
        return c.request(method, path, **kw)
    except ApiUnreachable as exc:
        err.print(f"{exc}. Is 'fmserve serve' running?")
        raise typer.Exit(1) from None
    except ApiError as exc:
        err.print(f"[red]HTTP {exc.status}[/red] {exc.error_code}: {exc.message}",
                  highlight=False)
        raise typer.Exit(1) from None
