"""Parent side of a worker process: spawn, admission control, restart on crash.

A :class:`WorkerProcess` owns one child (``python -m fmserve.engines.worker_main``)
and a socket to it. Requests are admitted while fewer than
``max_in_flight + max_queue`` are outstanding; the worker runs ``max_in_flight``
at once and the rest wait in its bounded inbox. Past that the caller gets
``503 TEMPORARILY_UNAVAILABLE`` with ``Retry-After`` at once (never a hang).

When the child dies (a native crash, ``kill -9``) every outstanding request gets
``503 TEMPORARILY_UNAVAILABLE`` with ``Retry-After``, and the child is started
again with exponential back-off (1 s, 2 s, 4 s … 30 s; reset after a stable minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from fmserve.engines import ipc
from fmserve.errors import FmserveError, TemporarilyUnavailable, from_code

log = logging.getLogger("fmserve.worker")

RESTART_RETRY_AFTER_S = 2


class WorkerProcess:
    """One supervised engine process.

    Args:
        name: label for logs and metrics (the served entity's name).
        spec: engine spec passed to the child (see ``worker_main``).
        log_path: file receiving the child's stdout/stderr.
        max_in_flight: requests the engine runs at once.
        max_queue: further requests allowed to wait.
        start_timeout_s: seconds to wait for the model to load.
    """

    def __init__(self, name: str, spec: dict[str, Any], log_path: Path, *,
                 max_in_flight: int = 1, max_queue: int = 64,
                 start_timeout_s: float = 300.0) -> None:
        self.name = name
        self.spec = spec
        self.log_path = log_path
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.start_timeout_s = start_timeout_s
        self.info: dict[str, Any] = {}
        self.state = "stopped"  # starting | ready | restarting | failed | stopped
        self.state_message = ""
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ready = asyncio.Event()
        self._closing = False
        self._monitor: asyncio.Task[None] | None = None
        self._crashes: list[float] = []

    # -- lifecycle -----------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        """Start the child and supervise it; returns once it is ready or failed."""
        self._closing = False
        self._monitor = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")
        await self.wait_ready(self.start_timeout_s)

    async def wait_ready(self, timeout_s: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        return self._ready.is_set()

    async def stop(self) -> None:
        self._closing = True
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
        self._kill()
        self.state = "stopped"

    def _kill(self) -> None:
        if self._writer:
            self._writer.close()
            self._writer = None
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._closing:
            started = time.monotonic()
            try:
                reader = await self._spawn()
                await self._pump(reader)
            except FmserveError as exc:  # the model failed to load
                self.state, self.state_message = "failed", exc.message
                self._ready.set()  # wake waiters; they see state == failed
                log.error("worker %s failed to start: %s", self.name, exc.message)
                return
            code = await asyncio.to_thread(self._proc.wait) if self._proc else None
            self._ready.clear()
            self._fail_pending(code)
            if self._closing:
                return
            self.restarts += 1
            self.state = "restarting"
            self.state_message = f"worker exited with code {code}; restarting"
            log.warning("worker %s (pid %s) exited with %s; restarting in %.0f s",
                        self.name, self.pid, code, backoff)
            if time.monotonic() - started > 60:
                backoff = 1.0
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _spawn(self) -> asyncio.StreamReader:
        self.state, self.state_message = "starting", "loading model"
        parent_sock, child_sock = socket.socketpair()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "fmserve.engines.worker_main",
                 "--fd", str(child_sock.fileno()), "--spec", orjson.dumps(self.spec).decode()],
                pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        finally:
            child_sock.close()
            logf.close()
        reader, writer = await asyncio.open_connection(sock=parent_sock)
        self._writer = writer
        first = await ipc.read_frame(reader)
        if first is None or first.get("t") != "ready":
            msg = ((first or {}).get("message")
                   or f"worker exited during start (see {self.log_path})")
            self._kill()
            raise FmserveError(msg)
        self.info = first.get("info", {})
        self.state, self.state_message = "ready", ""
        self._ready.set()
        log.info("worker %s ready (pid %s): %s", self.name, self.pid, self.info)
        return reader

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while True:
            frame = await ipc.read_frame(reader)
            if frame is None:
                return
            q = self._pending.get(frame.get("id", ""))
            if q is not None:
                q.put_nowait(frame)

    def _fail_pending(self, code: int | None) -> None:
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        for q in self._pending.values():
            q.put_nowait({"t": "err", "code": "TEMPORARILY_UNAVAILABLE",
                          "message": f"The model worker for '{self.name}' stopped ({how}) while "
                                     "serving this request; it is being restarted. Retry shortly.",
                          "retry_after": RESTART_RETRY_AFTER_S})
        self._pending.clear()

    # -- requests ------------------------------------------------------------
    def submit(self, op: dict[str, Any]) -> WorkerRequest:
        """Send one op to the worker; returns its event stream.

        Raises:
            TemporarilyUnavailable: 503 — the worker is (re)starting, failed, or
                its queue is full (``Retry-After`` set).
        """
        if self.state != "ready" or self._writer is None:
            detail = f": {self.state_message}" if self.state_message else ""
            raise TemporarilyUnavailable(
                f"The model worker for '{self.name}' is {self.state}{detail}.",
                retry_after=RESTART_RETRY_AFTER_S)
        if len(self._pending) >= self.max_in_flight + self.max_queue:
            raise TemporarilyUnavailable(
                f"'{self.name}' is at capacity ({len(self._pending)} requests running or "
                "queued). Retry shortly or lower concurrency.", retry_after=1)
        rid = f"{next(self._ids)}"
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[rid] = q
        self._writer.write(ipc.encode({**op, "id": rid}))
        return WorkerRequest(self, rid, q)

    def _release(self, rid: str, cancel: bool) -> None:
        if self._pending.pop(rid, None) is not None and cancel and self._writer is not None:
            self._writer.write(ipc.encode({"op": "cancel", "id": rid}))


class WorkerRequest:
    """Events of one request. Iterate it; ``close()`` cancels it in the worker.

    Error events are raised as :class:`~fmserve.errors.FmserveError` subclasses.
    """

    def __init__(self, worker: WorkerProcess, rid: str, q: asyncio.Queue[dict[str, Any]]):
        self._worker = worker
        self.rid = rid
        self._q = q
        self._done = False

    async def next(self) -> dict[str, Any]:
        ev = await self._q.get()
        t = ev.get("t")
        if t == "err":
            self._finish(cancel=False)
            raise from_code(ev.get("code", "INTERNAL_ERROR"), ev.get("message", ""),
                            ev.get("retry_after"))
        if t in ("end", "emb"):
            self._finish(cancel=False)
        return ev

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while not self._done:
                yield await self.next()
        finally:
            self.close()

    def _finish(self, cancel: bool) -> None:
        if not self._done:
            self._done = True
            self._worker._release(self.rid, cancel)

    def close(self) -> None:
        """Cancel the request in the worker if it has not finished."""
        self._finish(cancel=True)
