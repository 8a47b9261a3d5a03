"""Inference tables (governance §1.5, §3) and the usage tables as Delta Lake.

**On the query path** (cheap): with ``ai_gateway.inference_table_config.enabled``,
:meth:`GatewayPolicy.settle` adds :func:`payload` to the request's one request-log record
— the same durable append as the usage record, before the response's last byte — so a
request that was answered is in the log. ``request``/``response`` are the JSON bodies as
strings (a stream aggregated into one body by
:class:`~fmserve.protocol.stream_aggregate.StreamAggregator`; an error answer's
``{"error_code", "message"}``); a body over :data:`MAX_PAYLOAD_BYTES` (1 MB) is dropped and
named in ``logging_error_codes`` (``MAX_REQUEST_SIZE_EXCEEDED`` /
``MAX_RESPONSE_SIZE_EXCEEDED``).

**In the background**: :class:`TablesMaterializer` reads every replica's log from its
checkpoint (consumer :data:`CONSUMER`) and appends rows, one Delta commit per table per
batch, to ``<catalog>.<schema>.<prefix>_payload`` and to ``system.serving.endpoint_usage``
(records with usage tracking); ``system.serving.served_entities`` follows the store's rows
by merge. Every ``interval_s`` (``FMSERVE_TABLES_INTERVAL_S``, 5 s): a row is readable
within about that long after its response.

**Exactly once across kill -9.** Each append commits, in the same atomic Delta log entry,
an application transaction ``(app_id = "fmserve-log-<replica>", version = the log
position just after the batch's last record)`` (:func:`ordinal`). After a crash the
consumer restarts from the checkpoint in the store, which may be behind what the tables
hold; for each table it reads the transaction version back and skips the records at or
before it. So a Delta commit and the checkpoint never need to be atomic together: the
table itself says what it has. (Deduplicating by ``databricks_request_id`` instead would
need a scan of the table on every catch-up.) Several processes sharing one data dir take
a per-replica ``flock`` so that only one materialises a replica's log at a time.

**Upkeep**: every :data:`COMPACT_EVERY` commits to a table, small files are compacted
(``optimize.compact``) and files unreferenced for 7 days vacuumed; schemas never change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fmserve.store.db import now_ms
from fmserve.store.request_log import Position, read_entries, replicas
from fmserve.store.usage import UsageStore

if TYPE_CHECKING:  # deltalake and pyarrow load with the first table, not with the policy
    from fmserve.store.delta_tables import DeltaTables

log = logging.getLogger("fmserve.tables")

CONSUMER = "delta_tables"
MAX_PAYLOAD_BYTES = 1024 * 1024
COMPACT_EVERY = 50
ENTITY_SYNC_S = 5.0


def table_of(ai_gateway: Mapping[str, Any] | None) -> str | None:
    """``catalog.schema.<prefix>_payload`` when the endpoint's inference table is
    enabled, else None."""
    cfg = (ai_gateway or {}).get("inference_table_config") or {}
    if not cfg.get("enabled"):
        return None
    return f"{cfg['catalog_name']}.{cfg['schema_name']}.{cfg['table_name_prefix']}_payload"


def _text(body: Any) -> str | None:
    if body is None:
        return None
    if isinstance(body, str):
        return body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body).decode("utf-8", "replace")
    return orjson.dumps(body, default=str).decode()


def payload(table: str, request: Any, response: Any, started_ms: int) -> dict[str, Any]:
    """The inference part of a request-log record.

    ``request`` / ``response``: the JSON bodies (dict, or already-serialized str/bytes;
    None = no body, e.g. the client went away). ``execution_duration_ms``: from the
    request's admission to now (the answer complete, or the stream ended).
    """
    req, resp = _text(request), _text(response)
    codes: list[str] = []
    if req is not None and len(req) > MAX_PAYLOAD_BYTES // 4 and \
            len(req.encode()) > MAX_PAYLOAD_BYTES:
        req = None
        codes.append("MAX_REQUEST_SIZE_EXCEEDED")
    if resp is not None and len(resp) > MAX_PAYLOAD_BYTES // 4 and \
            len(resp.encode()) > MAX_PAYLOAD_BYTES:
        resp = None
        codes.append("MAX_RESPONSE_SIZE_EXCEEDED")
    return {"table": table, "request": req, "response": resp,
            "execution_duration_ms": max(0, now_ms() - started_ms),
            "logging_error_codes": codes}


def ordinal(pos: Position) -> int:
    """A log position as one increasing integer (segment number × 2⁴⁰ + byte offset):
    the Delta application-transaction version."""
    return int(pos.segment.split("-")[1].split(".")[0]) << 40 | pos.offset


def _ts(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def inference_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A §3 row of a request-log record carrying ``"inference"``."""
    inf = rec["inference"]
    t = _ts(rec["request_time"])
    assert t is not None
    return {"databricks_request_id": rec["databricks_request_id"], "request_date": t.date(),
            "client_request_id": rec.get("client_request_id"), "request_time": t,
            "status_code": rec["status_code"], "sampling_fraction": 1.0,
            "execution_duration_ms": inf.get("execution_duration_ms"),
            "request": inf.get("request"), "response": inf.get("response"),
            "logging_error_codes": inf.get("logging_error_codes") or [],
            "served_entity_id": rec.get("served_entity_id"), "requester": rec.get("requester")}


def usage_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A §2 ``endpoint_usage`` row of a usage record."""
    ctx = rec.get("usage_context")
    return {"account_id": None, "workspace_id": rec.get("workspace_id"),
            "client_request_id": rec.get("client_request_id"),
            "databricks_request_id": rec["databricks_request_id"],
            "requester": rec.get("requester"), "status_code": rec["status_code"],
            "request_time": _ts(rec["request_time"]),
            "input_token_count": rec.get("input_token_count"),
            "output_token_count": rec.get("output_token_count"),
            "input_character_count": rec.get("input_character_count"),
            "output_character_count": rec.get("output_character_count"),
            "usage_context": list(ctx.items()) if isinstance(ctx, dict) else None,
            "request_streaming": rec.get("request_streaming"),
            "served_entity_id": rec.get("served_entity_id")}


def entity_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """A §2 ``served_entities`` row of a store row (times in epoch ms there)."""
    row = {k: r.get(k) for k in ("served_entity_id", "workspace_id", "created_by",
                                 "endpoint_name", "endpoint_id", "served_entity_name",
                                 "entity_type", "entity_name", "entity_version",
                                 "endpoint_config_version", "task", "external_model_config",
                                 "foundation_model_config")}
    row["entity_version"] = _str(row["entity_version"])
    for key in ("external_model_config", "foundation_model_config"):
        cfg = row[key]
        row[key] = {k: _str(v) for k, v in cfg.items()} if isinstance(cfg, dict) else None
    row["change_time"] = _ts(r.get("change_time"))
    row["endpoint_delete_time"] = _ts(r.get("endpoint_delete_time"))
    return row


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


@contextmanager
def _replica_lock(root: Path, replica: str) -> Iterator[bool]:
    """An exclusive, non-blocking ``flock`` on ``<root>/.<replica>.tables.lock``: True
    when held (released on exit; a killed holder releases it with its process)."""
    f = open(root / f".{replica}.tables.lock", "a+b")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        f.close()


class TablesMaterializer:
    """Request-log records → Delta tables (see the module docstring).

    ``root``: the request-log root (one folder per replica). ``store``: where the
    checkpoints and the ``served_entities`` rows are. ``tables``: the Delta tables, or
    their base location (opened on first use: a server that writes no table never loads
    deltalake).
    """

    def __init__(self, root: Path, store: UsageStore, tables: DeltaTables | str,
                 interval_s: float = 1.0, compact_every: int = COMPACT_EVERY) -> None:
        self.root = root
        self.store = store
        self._tables = tables
        self.interval_s = interval_s
        self.compact_every = compact_every
        self._commits: dict[str, int] = {}
        self._entities: dict[str, dict[str, Any]] | None = None
        self._entities_at = 0.0
        self._pass = threading.Lock()
        self.rows_written = 0

    @property
    def tables(self) -> DeltaTables:
        if isinstance(self._tables, str):
            from fmserve.store.delta_tables import DeltaTables

            self._tables = DeltaTables(self._tables)
        return self._tables

    def run_once(self, entities: bool = True) -> int:
        """Materialise everything written so far (blocking; one pass at a time). Returns
        rows appended. Raises TableError when a table cannot be written (the checkpoint
        stays, the next pass retries)."""
        with self._pass:
            total = 0
            for replica in replicas(self.root):
                with _replica_lock(self.root, replica.name) as held:
                    if held:
                        total += self._replica(replica)
            # served_entities follows only once this process writes Delta rows: a server
            # whose endpoints track no usage and log no payloads never loads deltalake.
            if entities and (self.rows_written or self._entities is not None):
                self._sync_entities(force=self._entities is None)
            return total

    def _replica(self, replica: Path) -> int:
        pos = self.store.checkpoint(CONSUMER, replica.name)
        app_id = f"fmserve-log-{replica.name}"
        total = 0
        while True:
            entries, new = read_entries(replica, pos)
            if new is None or new == pos:
                return total
            total += self._batch(app_id, entries, new)
            self.store.materialize(CONSUMER, replica.name, [], new)  # the checkpoint only
            pos = new

    def _batch(self, app_id: str, entries: list[tuple[Position, dict[str, Any]]],
               end: Position) -> int:
        if not any(rec.get("inference") or rec.get("usage") for _, rec in entries):
            return 0  # nothing for a table: deltalake stays unloaded
        from fmserve.store.delta_tables import ENDPOINT_USAGE

        by_table: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for pos, rec in entries:
            if not rec.get("databricks_request_id"):
                continue
            if rec.get("inference"):
                by_table.setdefault(rec["inference"]["table"], []).append(
                    (ordinal(pos), inference_row(rec)))
            if rec.get("usage"):
                by_table.setdefault(ENDPOINT_USAGE, []).append((ordinal(pos), usage_row(rec)))
        version = ordinal(end)
        written = 0
        for table, items in by_table.items():
            done = self.tables.txn_version(table, app_id)
            rows = [row for at, row in items if done is None or at > done]
            if not rows:
                continue  # already committed before a crash
            self.tables.append(table, rows, app_id, version)
            written += len(rows)
            self._upkeep(table)
        self.rows_written += written
        return written

    def _upkeep(self, table: str) -> None:
        n = self._commits[table] = self._commits.get(table, 0) + 1
        if n % self.compact_every == 0:
            try:
                m = self.tables.compact(table)
                log.info("compacted %s: %s files → %s", table, m.get("numFilesRemoved"),
                         m.get("numFilesAdded"))
            except Exception:  # a concurrent writer won: next time
                log.warning("compaction of %s failed; retrying later", table, exc_info=True)

    def _sync_entities(self, force: bool = False) -> None:
        """``served_entities`` rows the Delta table lacks or holds in an older form
        (endpoint deleted since) are merged in; at most every :data:`ENTITY_SYNC_S`."""
        from fmserve.store.delta_tables import SERVED_ENTITIES, TableError

        if not force and time.monotonic() - self._entities_at < ENTITY_SYNC_S:
            return
        self._entities_at = time.monotonic()
        rows = {r["served_entity_id"]: entity_row(r) for r in self.store.entities()}
        if not rows and self._entities is None:
            return
        if self._entities is None:
            have = self.tables.ensure(SERVED_ENTITIES).to_pyarrow_table().to_pylist()
            self._entities = {r["served_entity_id"]: r for r in have}
        changed = [r for k, r in rows.items() if not _same(self._entities.get(k), r)]
        if not changed:
            return
        try:
            self.tables.merge_rows(SERVED_ENTITIES, changed, "served_entity_id")
        except TableError:
            self._entities = None  # re-read next time (another replica may have merged)
            raise
        for r in changed:
            self._entities[r["served_entity_id"]] = r

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # storage away, a table unwritable: keep the checkpoint
                log.exception("Delta table materialisation failed; retrying")
            await asyncio.sleep(self.interval_s)


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    if a is None:
        return False
    for k, v in b.items():
        w = a.get(k)
        if isinstance(v, dt.datetime) and isinstance(w, dt.datetime):
            if abs((v - w).total_seconds()) > 0.001:
                return False
        elif isinstance(v, dict) and isinstance(w, dict):
            if v != {x: w.get(x) for x in v}:
                return False
        elif v != w:
            return False
    return True


def check_config(endpoint: str, new: Mapping[str, Any] | None,
                 old: Mapping[str, Any] | None, tables: DeltaTables | None
                 ) -> dict[str, Any] | None:
    """An ``inference_table_config`` as stored and echoed: ``table_name_prefix`` defaults to
    the endpoint name (governance §1.1). Blocking (creates the table to prove the location
    is writable).

    Raises:
        InvalidParameterValue: 400 naming the field: catalog, schema or prefix changed while
            the table stays enabled (disable it first, as Databricks requires), or the table
            cannot be created or opened where the tables live (``FMSERVE_TABLES_URL`` or
            ``<data dir>/tables``) — nothing is stored then.
    """
    from fmserve.errors import InvalidParameterValue
    from fmserve.store.delta_tables import TableError

    if new is None:
        return None
    cfg = dict(new)
    if not cfg.get("table_name_prefix"):
        cfg["table_name_prefix"] = endpoint
    if old and old.get("enabled") and cfg.get("enabled"):
        for key in ("catalog_name", "schema_name", "table_name_prefix"):
            if old.get(key) != cfg.get(key):
                raise InvalidParameterValue(
                    f"Invalid value for 'inference_table_config.{key}': it cannot change "
                    f"while the inference table is enabled ('{old.get(key)}' → "
                    f"'{cfg.get(key)}'); disable the inference table first "
                    "(\"enabled\": false), then enable it with the new name.")
    table = table_of({"inference_table_config": cfg})
    if table is not None and tables is not None:
        try:
            tables.probe(table)
        except TableError as exc:
            raise InvalidParameterValue(
                f"Invalid value for 'inference_table_config': the inference table {table} "
                f"cannot be created where fmserve keeps its tables (FMSERVE_TABLES_URL or "
                f"<data dir>/tables): {exc}") from None
    return cfg
