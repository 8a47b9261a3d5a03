"""The request log: every governed request and its outcome, durable before it is answered.

Each server process appends JSON lines to segment files under
``<data dir>/request-log/<replica>/`` (``<replica>`` = host name and port, so a
restarted server finds its own segments); a request's response completes only after its
record is written.

Sync policy (``FMSERVE_REQUEST_LOG_SYNC``):

* ``write`` (default) — each record is handed to the OS (page cache) by one ``write``
  on the event loop (an ``O_APPEND`` write of one line: a few µs, no thread hop):
  survives ``kill -9`` of the server (the kernel still holds the bytes), not a power
  loss or kernel crash.
* ``fsync`` — one writer thread does **group commit**: it takes every record queued
  since its last write, writes them in one ``write`` and ``os.fsync``-s once, then wakes
  the requests waiting on them — a burst of N requests costs one sync, not N; survives
  a power loss, at the price of a disk flush in every answer's latency (measured by
  ``bench/bench_limits.py``).

Consumers (the usage tables here; the inference tables next) read the segments from a
checkpoint they keep in the store, so a restart catches up on everything written before
the crash; :meth:`RequestLog.segments` lists what there is to read. Records are dicts; a
line that does not parse (a torn last line after a crash) is skipped by readers, and a
restarted server starts a new segment rather than append after it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SEGMENT_BYTES = 64 * 1024 * 1024
SYNC_POLICIES = ("write", "fsync")


def replica_name(port: int) -> str:
    return f"{socket.gethostname()}-{port}"


@dataclass(frozen=True)
class Position:
    """Where a consumer has read to: a segment file name and a byte offset in it."""

    segment: str
    offset: int


class RequestLog:
    """The append side (one per server process)."""

    def __init__(self, root: Path, replica: str, sync: str = "write") -> None:
        if sync not in SYNC_POLICIES:
            raise ValueError(f"FMSERVE_REQUEST_LOG_SYNC must be one of {SYNC_POLICIES}, "
                             f"not {sync!r}")
        self.dir = root / replica
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self._queue: queue.SimpleQueue[tuple[bytes, asyncio.Future[None]] | None] = \
            queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        existing = sorted(self.dir.glob("seg-*.jsonl"))
        self._seq = int(existing[-1].stem.split("-")[1]) if existing else 0
        # Always a fresh segment: the last one may end in a line torn by a crash.
        self._file = self._open_next()
        self._lock = threading.Lock()  # the file, between the loop and the writer thread
        # The group-commit writer: only ``fsync`` needs one (``write`` writes in place).
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self.groups = 0  # groups written (for the benchmark: records / groups = batching)
        self.records = 0
        if sync == "fsync":
            self._thread.start()

    def _open_next(self) -> Any:
        self._seq += 1
        return open(self.dir / f"seg-{self._seq:08d}.jsonl", "ab")

    async def append(self, record: dict[str, Any]) -> None:
        """Returns once the record is written (and synced, under ``fsync``).

        Raises:
            OSError: it could not be written (disk full, ...): the request fails loudly.
        """
        if self.sync == "write":
            self._write_now(orjson.dumps(record) + b"\n")
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put((orjson.dumps(record) + b"\n", done))
        await done

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(batch)
                    return
                batch.append(nxt)
            self._write(batch)

    def _write_now(self, line: bytes) -> None:
        with self._lock:
            if self._file.tell() > SEGMENT_BYTES:
                self._file.close()
                self._file = self._open_next()
            self._file.write(line)
            self._file.flush()
            self.groups += 1
            self.records += 1

    def _write(self, batch: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            with self._lock:
                if self._file.tell() > SEGMENT_BYTES:
                    self._file.close()
                    self._file = self._open_next()
                self._file.write(b"".join(line for line, _ in batch))
                self._file.flush()
                os.fsync(self._file.fileno())
                self.groups += 1
                self.records += len(batch)
        except OSError as exc:  # disk full, ...: the waiting requests fail, loudly
            error = exc
        loop = self._loop
        if loop is None:
            return
        for _, fut in batch:
            loop.call_soon_threadsafe(_resolve, fut, error)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)
        with self._lock:
            self._file.close()


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def replicas(root: Path) -> list[Path]:
    """Every replica directory under the log root (this machine's processes)."""
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def read_from(replica_dir: Path, pos: Position | None,
              max_records: int = 5000) -> tuple[list[dict[str, Any]], Position | None]:
    """Records after ``pos`` (None = from the start), at most ``max_records``, and the
    position after the last one returned (``pos`` unchanged when there is nothing new).
    Only whole lines are read: a line still being written is left for next time."""
    entries, end = read_entries(replica_dir, pos, max_records)
    return [rec for _, rec in entries], end


def read_entries(replica_dir: Path, pos: Position | None, max_records: int = 5000
                 ) -> tuple[list[tuple[Position, dict[str, Any]]], Position | None]:
    """As :func:`read_from`, each record with the position just after its line (so a
    consumer that commits elsewhere can tell which records a commit already covers)."""
    segments = sorted(replica_dir.glob("seg-*.jsonl"))
    out: list[tuple[Position, dict[str, Any]]] = []
    for seg in segments:
        if pos is not None and seg.name < pos.segment:
            continue
        offset = pos.offset if pos is not None and seg.name == pos.segment else 0
        last = seg == segments[-1]  # only the newest may still be growing
        with open(seg, "rb") as f:
            f.seek(offset)
            for line in (_whole_lines(f) if last else f):
                offset += len(line)
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    rec = None
                pos = Position(seg.name, offset)
                if isinstance(rec, dict):
                    out.append((pos, rec))
                if len(out) >= max_records:
                    return out, pos
        if pos is None or pos.segment != seg.name:
            pos = Position(seg.name, offset)
    return out, pos


def _whole_lines(f: Any) -> Iterator[bytes]:
    for line in f:
        if not line.endswith(b"\n"):
            return
        yield line
