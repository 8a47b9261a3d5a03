"""Usage tables (``endpoint_usage``, ``served_entities``) and request-log checkpoints.

Blocking database I/O (run in a worker thread). :meth:`UsageStore.materialize` inserts a
batch of request-log records and moves the consumer's checkpoint **in one transaction**,
and skips ids already present, so a crash between the two, or a replay after a restart,
never loses or doubles a row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update

from fmserve.store.db import Database
from fmserve.store.models import EndpointUsage, LogCheckpoint, ServedEntityRow
from fmserve.store.request_log import Position

USAGE_COLUMNS = ("databricks_request_id", "client_request_id", "workspace_id", "requester",
                 "status_code", "request_time", "input_token_count", "output_token_count",
                 "input_character_count", "output_character_count", "usage_context",
                 "request_streaming", "served_entity_id", "endpoint_name")
ENTITY_COLUMNS = ("served_entity_id", "workspace_id", "created_by", "endpoint_name",
                  "endpoint_id", "served_entity_name", "entity_type", "entity_name",
                  "entity_version", "endpoint_config_version", "task",
                  "external_model_config", "foundation_model_config", "change_time",
                  "endpoint_delete_time")


@dataclass(frozen=True)
class UsageSummary:
    endpoint_name: str
    requester: str
    day: str  # YYYY-MM-DD (UTC)
    requests: int
    errors: int  # status >= 400
    throttled: int  # status 429
    input_tokens: int
    output_tokens: int


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def checkpoint(self, consumer: str, replica: str) -> Position | None:
        with self.db.session() as s:
            row = s.get(LogCheckpoint, (consumer, replica))
        return Position(row.segment, row.offset) if row else None

    def materialize(self, consumer: str, replica: str, records: list[dict[str, Any]],
                    pos: Position) -> int:
        """Insert the usage rows among ``records`` (those with ``"usage": true``) that are
        not stored yet, and set the checkpoint to ``pos``. Returns rows inserted."""
        rows = {r["databricks_request_id"]: r for r in records
                if r.get("usage") and r.get("databricks_request_id")}
        with self.db.session() as s, s.begin():
            if rows:
                have = set(s.scalars(select(EndpointUsage.databricks_request_id).where(
                    EndpointUsage.databricks_request_id.in_(list(rows)))))
                new = [{c: r.get(c) for c in USAGE_COLUMNS}
                       for rid, r in rows.items() if rid not in have]
                if new:  # one executemany (Core): no ORM object per row
                    s.execute(insert(EndpointUsage), new)
            cp = s.get(LogCheckpoint, (consumer, replica))
            if cp is None:
                s.add(LogCheckpoint(consumer=consumer, replica=replica, segment=pos.segment,
                                    offset=pos.offset))
            else:
                cp.segment, cp.offset = pos.segment, pos.offset
        return len(rows)

    def record_entities(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add ``served_entities`` rows (one per entity of a new config version); a row whose
        id exists is left as it is."""
        with self.db.session() as s, s.begin():
            for r in rows:
                if s.get(ServedEntityRow, r["served_entity_id"]) is None:
                    s.add(ServedEntityRow(**{c: r.get(c) for c in ENTITY_COLUMNS}))

    def mark_deleted(self, endpoint_name: str, at_ms: int) -> None:
        with self.db.session() as s, s.begin():
            s.execute(update(ServedEntityRow).where(
                ServedEntityRow.endpoint_name == endpoint_name,
                ServedEntityRow.endpoint_delete_time.is_(None)).values(
                endpoint_delete_time=at_ms))

    def usage(self, endpoint_name: str | None = None) -> list[dict[str, Any]]:
        """``endpoint_usage`` rows, oldest first."""
        q = select(EndpointUsage).order_by(EndpointUsage.request_time)
        if endpoint_name:
            q = q.where(EndpointUsage.endpoint_name == endpoint_name)
        with self.db.session() as s:
            return [{c: getattr(r, c) for c in USAGE_COLUMNS} for r in s.scalars(q)]

    def entities(self, endpoint_name: str | None = None) -> list[dict[str, Any]]:
        q = select(ServedEntityRow).order_by(ServedEntityRow.change_time)
        if endpoint_name:
            q = q.where(ServedEntityRow.endpoint_name == endpoint_name)
        with self.db.session() as s:
            return [{c: getattr(r, c) for c in ENTITY_COLUMNS} for r in s.scalars(q)]

    def summary(self, since_ms: int = 0) -> list[UsageSummary]:
        """Requests and tokens by endpoint, requester and UTC day."""
        q = select(EndpointUsage.endpoint_name, EndpointUsage.requester,
                   EndpointUsage.request_time, EndpointUsage.status_code,
                   EndpointUsage.input_token_count, EndpointUsage.output_token_count).where(
            EndpointUsage.request_time >= since_ms)
        acc: dict[tuple[str, str, str], list[int]] = {}
        with self.db.session() as s:
            for ep, who, t, status, tin, tout in s.execute(q):
                day = dt.datetime.fromtimestamp(t / 1000, dt.UTC).strftime("%Y-%m-%d")
                a = acc.setdefault((ep, who, day), [0, 0, 0, 0, 0])
                a[0] += 1
                a[1] += status >= 400
                a[2] += status == 429
                a[3] += tin
                a[4] += tout
        return [UsageSummary(ep, who, day, *vals) for (ep, who, day), vals in sorted(acc.items())]

    def count(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(EndpointUsage)) or 0)
