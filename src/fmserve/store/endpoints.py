"""Stored serving-endpoint definitions (table ``serving_endpoints``)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from fmserve.errors import ResourceAlreadyExists, ResourceDoesNotExist
from fmserve.store.db import Database, now_ms
from fmserve.store.models import Endpoint


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    id: str
    creator: str
    creation_timestamp: int
    last_updated_timestamp: int
    description: str
    task: str
    config_version: int
    config: dict[str, Any]
    tags: list[dict[str, Any]]
    ai_gateway: dict[str, Any] | None
    rate_limits: list[dict[str, Any]] | None


def _record(row: Endpoint) -> EndpointRecord:
    return EndpointRecord(row.name, row.id, row.creator, row.creation_timestamp,
                          row.last_updated_timestamp, row.description, row.task,
                          row.config_version, row.config, list(row.tags or []), row.ai_gateway,
                          row.rate_limits)


class EndpointStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, *, name: str, creator: str, task: str, config: dict[str, Any],
               description: str = "", tags: list[dict[str, Any]] | None = None,
               ai_gateway: dict[str, Any] | None = None,
               rate_limits: list[dict[str, Any]] | None = None) -> EndpointRecord:
        """Insert a new endpoint at config version 1.

        Raises:
            ResourceAlreadyExists: 409 when the name is taken.
        """
        ts = now_ms()
        row = Endpoint(name=name, id=secrets.token_hex(16), creator=creator,
                       creation_timestamp=ts, last_updated_timestamp=ts,
                       description=description, task=task, config_version=1, config=config,
                       tags=tags or [], ai_gateway=ai_gateway, rate_limits=rate_limits)
        try:
            with self.db.session() as s, s.begin():
                s.add(row)
        except IntegrityError:
            raise ResourceAlreadyExists(f"Endpoint with name '{name}' already exists.") from None
        return _record(row)

    def get(self, name: str) -> EndpointRecord | None:
        with self.db.session() as s:
            row = s.get(Endpoint, name)
            return _record(row) if row else None

    def all(self) -> list[EndpointRecord]:
        with self.db.session() as s:
            return [_record(r) for r in s.scalars(select(Endpoint).order_by(Endpoint.name))]

    def update(self, name: str, **fields: Any) -> EndpointRecord:
        """Change stored fields; ``config=`` also bumps ``config_version``.

        Raises:
            ResourceDoesNotExist: 404 for an unknown name.
        """
        with self.db.session() as s, s.begin():
            row = s.get(Endpoint, name, with_for_update=True)
            if row is None:
                raise ResourceDoesNotExist(f"Endpoint with name '{name}' does not exist.")
            if "config" in fields:
                row.config_version += 1
            for key, value in fields.items():
                setattr(row, key, value)
            row.last_updated_timestamp = now_ms()
            return _record(row)

    def delete(self, name: str) -> bool:
        with self.db.session() as s, s.begin():
            row = s.get(Endpoint, name)
            if row is None:
                return False
            s.delete(row)
            return True
