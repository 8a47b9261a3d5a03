"""Delta Lake tables (delta-rs, ``deltalake``): inference tables and the usage system tables.

Layout: a table ``<catalog>.<schema>.<table>`` lives at ``<base>/<catalog>/<schema>/<table>``,
where ``<base>`` is ``FMSERVE_TABLES_URL`` (any URL deltalake writes to: a plain path,
``file://``, ``s3://``, ``gs://``, ``az://`` … with credentials from the usual environment
variables) or ``<data dir>/tables``. DuckDB (``delta_scan``), Spark (delta-spark), pandas and
polars read them as they are: plain Delta protocol (reader 1 / writer 2: no deletion
vectors, no column mapping), Parquet files, the column types of governance §2–§3.

Schemas (:data:`SCHEMAS`) are fixed: a table is created with its schema once and never
altered (no ``schema_mode``); a table found with other columns is an error, never
"fixed" under a reader. Blocking I/O throughout (call from a worker thread).

Exactly-once appends: :meth:`DeltaTables.append` commits rows together with a Delta
*application transaction* ``(app_id, version)`` (the ``txn`` action, delta-rs
``CommitProperties(app_transactions=…)``) in the same atomic log entry, and
:meth:`DeltaTables.txn_version` reads it back; the consumer (``gateway/inference_tables.py``)
uses the request-log position as the version, so a commit either happened with its
position or not at all.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake import Schema as DeltaSchema

log = logging.getLogger("fmserve.tables")

ENDPOINT_USAGE = "system.serving.endpoint_usage"
SERVED_ENTITIES = "system.serving.served_entities"

# Governance §3: the AI Gateway inference table (``<prefix>_payload``).
INFERENCE_SCHEMA = pa.schema([
    ("databricks_request_id", pa.string()),
    ("request_date", pa.date32()),
    ("client_request_id", pa.string()),
    ("request_time", pa.timestamp("us", tz="UTC")),
    ("status_code", pa.int32()),
    ("sampling_fraction", pa.float64()),
    ("execution_duration_ms", pa.int64()),
    ("request", pa.string()),
    ("response", pa.string()),
    ("logging_error_codes", pa.list_(pa.string())),
    ("served_entity_id", pa.string()),
    ("requester", pa.string()),
])

# Governance §2: system.serving.endpoint_usage (one row per request).
USAGE_SCHEMA = pa.schema([
    ("account_id", pa.string()),
    ("workspace_id", pa.string()),
    ("client_request_id", pa.string()),
    ("databricks_request_id", pa.string()),
    ("requester", pa.string()),
    ("status_code", pa.int32()),
    ("request_time", pa.timestamp("us", tz="UTC")),
    ("input_token_count", pa.int64()),
    ("output_token_count", pa.int64()),
    ("input_character_count", pa.int64()),
    ("output_character_count", pa.int64()),
    ("usage_context", pa.map_(pa.string(), pa.string())),
    ("request_streaming", pa.bool_()),
    ("served_entity_id", pa.string()),
])

_ENTITY_CONFIG = pa.struct([("entity_name", pa.string()), ("entity_version", pa.string())])
# Governance §2: system.serving.served_entities (one row per entity per config version).
ENTITIES_SCHEMA = pa.schema([
    ("served_entity_id", pa.string()),
    ("account_id", pa.string()),
    ("workspace_id", pa.string()),
    ("created_by", pa.string()),
    ("endpoint_name", pa.string()),
    ("endpoint_id", pa.string()),
    ("served_entity_name", pa.string()),
    ("entity_type", pa.string()),
    ("entity_name", pa.string()),
    ("entity_version", pa.string()),
    ("endpoint_config_version", pa.int32()),
    ("task", pa.string()),
    ("external_model_config", pa.struct([("provider", pa.string()), ("name", pa.string()),
                                         ("task", pa.string())])),
    ("foundation_model_config", _ENTITY_CONFIG),
    ("custom_model_config", _ENTITY_CONFIG),
    ("feature_spec_config", _ENTITY_CONFIG),
    ("change_time", pa.timestamp("us", tz="UTC")),
    ("endpoint_delete_time", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class TableKind:
    schema: pa.Schema
    partition_by: tuple[str, ...]
    description: str


INFERENCE = TableKind(INFERENCE_SCHEMA, ("request_date",),
                      "AI Gateway inference table: request and response payloads")
SCHEMAS: dict[str, TableKind] = {
    ENDPOINT_USAGE: TableKind(USAGE_SCHEMA, (), "Serving endpoint usage, one row per request"),
    SERVED_ENTITIES: TableKind(ENTITIES_SCHEMA, (),
                               "Served entities, one row per entity and config version"),
}

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
TABLE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,254}$")


class TableError(Exception):
    """A table cannot be created, opened or written (location, permissions, schema)."""


def kind_of(full_name: str) -> TableKind:
    """The schema of a table by name: the system tables by name, else an inference table."""
    return SCHEMAS.get(full_name, INFERENCE)


def split_name(full_name: str) -> tuple[str, str, str]:
    """``catalog.schema.table`` → its three parts. Raises ValueError otherwise."""
    parts = full_name.split(".")
    if len(parts) != 3 or not all(TABLE_PART_RE.match(p) for p in parts):
        raise ValueError(f"'{full_name}' is not a table name of the form catalog.schema.table "
                         "(letters, digits, '_' and '-')")
    return parts[0], parts[1], parts[2]


class DeltaTables:
    """The Delta tables under one base location.

    ``base``: a URL or a local path (made absolute). ``storage_options``: passed to delta-rs
    (object-store credentials); None = from the environment.
    """

    def __init__(self, base: str | Path, storage_options: dict[str, str] | None = None) -> None:
        text = str(base)
        if "://" not in text:
            text = str(Path(text).expanduser().absolute())
        self.base = text.rstrip("/")
        self.storage_options = storage_options
        self._open: dict[str, DeltaTable] = {}

    @property
    def local_root(self) -> Path | None:
        """The base as a local directory (plain paths and ``file://``), else None."""
        if "://" not in self.base:
            return Path(self.base)
        u = urlparse(self.base)
        return Path(u.path) if u.scheme == "file" else None

    def uri(self, full_name: str) -> str:
        return "/".join((self.base, *split_name(full_name)))

    # -- create / open ------------------------------------------------------------------
    def ensure(self, full_name: str) -> DeltaTable:
        """The table, created (empty, with its schema) when missing.

        Raises:
            TableError: the location cannot be written or read, or the table there has
                other columns than :func:`kind_of` says (it is left untouched).
        """
        dt = self._open.get(full_name)
        if dt is not None:
            return dt
        kind = kind_of(full_name)
        uri = self.uri(full_name)
        try:
            if self.local_root is not None:  # delta-rs wants the folder to exist
                Path(urlparse(uri).path if uri.startswith("file:") else uri).mkdir(
                    parents=True, exist_ok=True)
            dt = DeltaTable.create(uri, kind.schema, mode="ignore",
                                   partition_by=list(kind.partition_by) or None,
                                   name=full_name.split(".")[-1], description=kind.description,
                                   storage_options=self.storage_options)
        except Exception as exc:  # delta-rs raises its own types and OSError alike
            raise TableError(f"cannot create or open Delta table {full_name} at {uri}: "
                             f"{_first_line(exc)}") from exc
        _check_schema(full_name, dt, kind)
        self._open[full_name] = dt
        return dt

    def probe(self, full_name: str) -> str:
        """Creates (or opens) the table now and returns its URI: the config-time check that
        the location is writable. Raises TableError."""
        self._open.pop(full_name, None)
        self.ensure(full_name)
        return self.uri(full_name)

    # -- exactly-once appends -------------------------------------------------------------
    def txn_version(self, full_name: str, app_id: str) -> int | None:
        """The last application-transaction version ``app_id`` committed to the table (after
        reading the log's newest entries), or None."""
        dt = self.ensure(full_name)
        dt.update_incremental()
        return dt.transaction_version(app_id)

    def append(self, full_name: str, rows: list[dict[str, Any]], app_id: str,
               version: int) -> None:
        """Append ``rows`` (dicts with the schema's columns; missing ones are null) and
        record ``(app_id, version)`` in the same commit. Raises TableError."""
        dt = self.ensure(full_name)
        kind = kind_of(full_name)
        data = pa.Table.from_pylist(rows, schema=kind.schema)
        try:
            write_deltalake(dt, data, mode="append",
                            partition_by=list(kind.partition_by) or None,
                            commit_properties=CommitProperties(
                                app_transactions=[Transaction(app_id, version)],
                                max_commit_retries=50))
        except Exception as exc:
            self._open.pop(full_name, None)  # reopen next time (the log may have moved)
            raise TableError(f"cannot append to {full_name}: {_first_line(exc)}") from exc

    def merge_rows(self, full_name: str, rows: list[dict[str, Any]], key: str) -> None:
        """Insert ``rows`` whose ``key`` is new and update those whose row changed (for the
        slowly-changing ``served_entities``)."""
        dt = self.ensure(full_name)
        data = pa.Table.from_pylist(rows, schema=kind_of(full_name).schema)
        try:
            (dt.merge(data, f"t.{key} = s.{key}", source_alias="s", target_alias="t")
             .when_matched_update_all().when_not_matched_insert_all().execute())
        except Exception as exc:
            self._open.pop(full_name, None)
            raise TableError(f"cannot merge into {full_name}: {_first_line(exc)}") from exc

    # -- upkeep ---------------------------------------------------------------------------
    def compact(self, full_name: str, vacuum_hours: int = 168) -> dict[str, Any]:
        """Rewrite small files into bigger ones (a commit readers see as no data change) and
        delete files unreferenced for ``vacuum_hours`` (7 days by default: readers on an
        older snapshot and time travel within that window keep working)."""
        dt = self.ensure(full_name)
        dt.update_incremental()
        metrics = dt.optimize.compact()
        dt.vacuum(retention_hours=vacuum_hours, dry_run=False)
        return metrics

    # -- reading (CLI, tests) ---------------------------------------------------------------
    def names(self) -> list[str]:
        """Every ``catalog.schema.table`` with a Delta log under the base (three levels)."""
        root = self.local_root
        found: list[str] = []
        if root is not None:
            if not root.is_dir():
                return []
            for log_dir in sorted(root.glob("*/*/*/_delta_log")):
                cat, sch, tbl = log_dir.parent.relative_to(root).parts
                found.append(f"{cat}.{sch}.{tbl}")
            return found
        from pyarrow import fs as pafs

        filesystem, path = pafs.FileSystem.from_uri(self.base)
        for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
            rel = info.path[len(path):].strip("/").split("/")
            if len(rel) == 4 and rel[3] == "_delta_log":
                found.append(".".join(rel[:3]))
        return sorted(found)

    def open(self, full_name: str) -> DeltaTable:
        """An existing table (for reading). Raises TableError when there is none."""
        uri = self.uri(full_name)
        try:
            return DeltaTable(uri, storage_options=self.storage_options)
        except Exception as exc:
            raise TableError(f"no Delta table {full_name} at {uri}: {_first_line(exc)}") \
                from exc


def _check_schema(full_name: str, dt: DeltaTable, kind: TableKind) -> None:
    want = _columns(DeltaSchema.from_arrow(kind.schema).to_json())
    have = _columns(dt.schema().to_json())
    if want != have:
        raise TableError(f"Delta table {full_name} at {dt.table_uri} exists with other "
                         f"columns ({', '.join(n for n, _ in have)}); fmserve never changes a "
                         "table's schema: point the config at another table or drop it")
    if list(dt.metadata().partition_columns) != list(kind.partition_by):
        raise TableError(f"Delta table {full_name} at {dt.table_uri} is partitioned by "
                         f"{dt.metadata().partition_columns}, not {list(kind.partition_by)}")


def _columns(schema_json: str) -> list[tuple[str, str]]:
    import json

    def norm(t: Any) -> Any:  # types without nullability / field metadata
        if isinstance(t, dict):
            return {k: norm(v) for k, v in t.items()
                    if k not in ("nullable", "metadata", "containsNull", "valueContainsNull")}
        if isinstance(t, list):
            return [norm(x) for x in t]
        return t

    return [(f["name"], json.dumps(norm(f["type"]), sort_keys=True))
            for f in json.loads(schema_json)["fields"]]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n")[:2])

