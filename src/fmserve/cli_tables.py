"""``fmserve tables list|show``: the Delta tables (inference tables, ``system.serving.*``)
read directly from where the server writes them (``FMSERVE_TABLES_URL`` or
``<data dir>/tables``), with ``deltalake``; no server needed."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fmserve.cli_common import DataDir, console, err
from fmserve.config import default_data_dir, tables_base

app = typer.Typer(help="Inference tables and usage tables (Delta Lake).", no_args_is_help=True)

TablesUrl = Annotated[str | None, typer.Option(
    "--tables-url", envvar="FMSERVE_TABLES_URL",
    help="Where the tables live (default <data dir>/tables).")]
CELL_CHARS = 160  # longer values (request/response bodies) are cut for display


def _tables(data_dir: Any, tables_url: str | None) -> Any:
    from fmserve.store.delta_tables import DeltaTables

    return DeltaTables(tables_base(data_dir or default_data_dir(), tables_url))


@app.command("list")
def list_tables(data_dir: DataDir = None, tables_url: TablesUrl = None) -> None:
    """Every table: name, rows, data files, Delta version and last commit time."""
    from fmserve.store.delta_tables import TableError

    tables = _tables(data_dir, tables_url)
    names = tables.names()
    if not names:
        err.print(f"No tables under {tables.base}. Inference tables appear when an endpoint's "
                  "AI Gateway has inference_table_config enabled; the system.serving tables "
                  "with usage tracking.", highlight=False)
        raise typer.Exit(0)
    out = Table("table", "rows", "files", "version", "last commit (UTC)", "location")
    for name in names:
        try:
            t = tables.open(name)
            actions = t.get_add_actions(flatten=True)
            rows = sum(v or 0 for v in actions.column("num_records").to_pylist()) \
                if actions.num_rows else 0
            last = t.history(1)[0].get("timestamp")
            when = dt.datetime.fromtimestamp(last / 1000, dt.UTC).strftime(
                "%Y-%m-%d %H:%M:%S") if last else ""
            out.add_row(name, f"{rows:,}", str(actions.num_rows), str(t.version()), when,
                        tables.uri(name))
        except TableError as exc:
            out.add_row(name, "?", "?", "?", "", str(exc))
    console.print(out)


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="catalog.schema.table")],
         limit: Annotated[int, typer.Option(help="Rows to show (newest first).")] = 20,
         data_dir: DataDir = None, tables_url: TablesUrl = None) -> None:
    """The newest rows of a table (by ``request_time`` or ``change_time`` where it has one)."""
    from fmserve.store.delta_tables import TableError, split_name

    try:
        split_name(name)
        t = _tables(data_dir, tables_url).open(name)
    except (ValueError, TableError) as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    data = t.to_pyarrow_table()
    columns = data.column_names
    order = next((c for c in ("request_time", "change_time") if c in columns), None)
    if order is not None and data.num_rows:
        data = data.sort_by([(order, "descending")])
    rows = data.slice(0, max(0, limit)).to_pylist()
    out = Table(*columns, title=f"{name} ({len(rows)} of {data.num_rows:,} rows)")
    for col in out.columns:
        col.overflow = "fold"
    for r in rows:
        out.add_row(*(_cell(r[c]) for c in columns))
    console.print(out)


def _cell(v: Any) -> Text:
    """A value as plain text (never Rich markup: bodies are full of brackets)."""
    if v is None:
        return Text("null", style="dim")
    if isinstance(v, dt.datetime):
        text = v.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    else:
        text = str(v)
    return Text(text if len(text) <= CELL_CHARS
                else text[:CELL_CHARS] + f"… ({len(text):,} chars)")
