"""``fmserve usage``: requests and tokens by endpoint, requester and day, read from the
``endpoint_usage`` table (endpoints with ``usage_tracking_config.enabled``)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fmserve.cli_common import DataDir, DbUrl, console, err
from fmserve.config import ServerConfig, default_data_dir
from fmserve.store.db import now_ms


def usage(
    days: Annotated[int, typer.Option(help="Only the last N days (0 = all).")] = 7,
    endpoint: Annotated[str | None, typer.Option(help="Only this endpoint.")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Usage of the endpoints that track it: requests, errors, 429s and tokens per
    endpoint, requester and day (UTC). Reads the server's database (the data dir, or
    --database-url when replicas share PostgreSQL); rows appear within about a second of
    each request."""
    from fmserve.store.db import open_database
    from fmserve.store.usage import UsageStore

    cfg = ServerConfig(data_dir=data_dir or default_data_dir(), database_url=database_url)
    db = open_database(cfg)
    try:
        since = now_ms() - days * 86_400_000 if days > 0 else 0
        rows = [r for r in UsageStore(db).summary(since)
                if endpoint is None or r.endpoint_name == endpoint]
    finally:
        db.close()
    if not rows:
        err.print("No usage recorded. Usage is tracked for endpoints whose AI Gateway has "
                  "usage_tracking_config: {\"enabled\": true}.", highlight=False)
        raise typer.Exit(0)
    table = Table("day", "endpoint", "requester", "requests", "errors", "429s",
                  "input tokens", "output tokens")
    for r in rows:
        table.add_row(r.day, r.endpoint_name, r.requester, f"{r.requests:,}",
                      f"{r.errors:,}", f"{r.throttled:,}", f"{r.input_tokens:,}",
                      f"{r.output_tokens:,}")
    console.print(table)
