"""Usage tracking: what a request asks for, what it got, and the usage-table rows.

A query's :class:`Demand` (characters in, tokens to reserve) is measured once the body
is parsed; its :class:`Outcome` (status, ``usage``, characters out) when it ends. With
``usage_tracking_config.enabled`` the gateway appends :func:`usage_record` to the
request log before the response completes, and :class:`UsageMaterializer` copies the
records into ``endpoint_usage`` in the background (governance §2 columns).

Token counts are the answer's ``usage``; where there is none (an error, a provider that
reports none) they are estimated as ``(characters + 1) // 4`` (governance §1.5, from
Databricks' usage-tracking docs).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmserve.store.request_log import read_from, replicas
from fmserve.store.usage import UsageStore

log = logging.getLogger("fmserve.usage")

CONSUMER = "usage"


def estimate_tokens(characters: int) -> int:
    """Databricks' estimate when a model reports no token count: ``(text_length + 1) / 4``."""
    return (characters + 1) // 4 if characters > 0 else 0


@dataclass(frozen=True)
class Demand:
    """What a parsed request asks for.

    ``input_characters``: characters of its text (messages, prompt or input).
    ``reserve_tokens``: the most tokens it can use (an upper bound on prompt tokens plus
    ``max_tokens``), reserved against tokens-per-minute limits at admission.
    """

    input_characters: int
    reserve_tokens: int
    streaming: bool


@dataclass(frozen=True)
class Outcome:
    """How a request ended. ``body``: the response body (a dict, or already-serialized
    JSON str/bytes; a stream's aggregated answer; an error's ``{"error_code",
    "message"}``), kept only for inference tables; None when there is none."""

    status: int
    usage: Mapping[str, Any] | None = None
    output_characters: int = 0
    body: Any = None

    def tokens(self, demand: Demand | None) -> tuple[int, int]:
        """``(input, output)`` tokens: from ``usage`` when given, else the estimate."""
        u = self.usage or {}
        tin = u.get("prompt_tokens", u.get("input_tokens"))
        tout = u.get("completion_tokens", u.get("output_tokens"))
        if not isinstance(tin, int):
            tin = estimate_tokens(demand.input_characters) if demand else 0
        if not isinstance(tout, int):
            tout = estimate_tokens(self.output_characters)
        return tin, tout


def usage_record(*, request_id: str, client_request_id: str | None, workspace_id: str,
                 requester: str, endpoint: str, served_entity_id: str | None,
                 request_time_ms: int, demand: Demand | None, outcome: Outcome,
                 usage_context: Mapping[str, Any] | None, streaming: bool) -> dict[str, Any]:
    """One ``endpoint_usage`` row as a request-log record (``"usage": true``)."""
    tin, tout = outcome.tokens(demand)
    return {"usage": True, "databricks_request_id": request_id,
            "client_request_id": client_request_id, "workspace_id": workspace_id,
            "requester": requester, "status_code": outcome.status,
            "request_time": request_time_ms, "input_token_count": tin,
            "output_token_count": tout,
            "input_character_count": demand.input_characters if demand else 0,
            "output_character_count": outcome.output_characters,
            "usage_context": dict(usage_context) if usage_context else None,
            "request_streaming": streaming, "served_entity_id": served_entity_id,
            "endpoint_name": endpoint}


class UsageMaterializer:
    """Copies usage records from every replica log in ``root`` into ``endpoint_usage``,
    every ``interval_s`` (and once at start: a restart catches up on what a crash left)."""

    def __init__(self, root: Path, store: UsageStore, interval_s: float = 1.0) -> None:
        self.root = root
        self.store = store
        self.interval_s = interval_s
        # One pass at a time: cancelling :meth:`run` does not stop a pass already running
        # in its thread, and the shutdown pass must not read the same checkpoint and
        # insert the same rows beside it (the second insert fails on the primary key).
        self._pass = threading.Lock()

    def run_once(self) -> int:
        """Materialise everything written so far. Blocking (waits for a pass already
        running in another thread); returns rows inserted."""
        with self._pass:
            return self._run_once()

    def _run_once(self) -> int:
        total = 0
        for replica in replicas(self.root):
            pos = self.store.checkpoint(CONSUMER, replica.name)
            while True:
                records, new = read_from(replica, pos)
                if new is None or new == pos:
                    break
                total += self.store.materialize(CONSUMER, replica.name, records, new)
                pos = new
        return total

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # the database is away: try again next round
                log.exception("usage materialisation failed; retrying")
            await asyncio.sleep(self.interval_s)
