"""Replicas of one served entity's worker: provisioned throughput and scale-to-zero.

A :class:`WorkerPool` runs between ``min_replicas`` and ``max_replicas``
:class:`~fmserve.engines.supervisor.WorkerProcess` replicas of the same model and
sends each request to the least-loaded ready replica.

* **Scale up**: when every ready replica has ``scale_up_at`` or more requests
  outstanding and fewer than ``max_replicas`` run, one more replica starts (in the
  background; requests keep flowing to the existing ones).
* **Scale down**: a replica above ``min_replicas`` that had nothing to do for
  ``scale_down_after_s`` seconds is stopped.
* **Scale to zero** (``scale_to_zero``): after ``idle_timeout_s`` seconds without
  a request every replica stops; the next request starts one and waits for it
  (a cold start, not an error).

Throughput units: a provisioned-throughput entity asks for tokens/s; the manager
turns that into replicas with the model's ``throughput_chunk_size`` (tokens/s one
replica sustains, see ``serving/catalog.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from fmserve.engines.supervisor import RESTART_RETRY_AFTER_S, WorkerProcess, WorkerRequest
from fmserve.errors import TemporarilyUnavailable


class WorkerPool:
    """Same surface as one worker (``submit``, ``state``, ``info`` …), backed by replicas."""

    def __init__(self, name: str, spec: dict[str, Any], log_path: Path, *,
                 min_replicas: int = 1, max_replicas: int = 1, max_queue: int = 64,
                 scale_to_zero: bool = False, idle_timeout_s: float = 300.0,
                 scale_up_at: int = 2, scale_down_after_s: float = 60.0) -> None:
        self.name = name
        self.spec = spec
        self.log_path = log_path
        self.min_replicas = min_replicas
        self.max_replicas = max(max_replicas, min_replicas, 1)
        self.max_queue = max_queue
        self.scale_to_zero = scale_to_zero
        self.idle_timeout_s = idle_timeout_s
        self.scale_up_at = scale_up_at
        self.scale_down_after_s = scale_down_after_s
        self.replicas: list[WorkerProcess] = []
        self.info: dict[str, Any] = {}
        self.scaled_to_zero = False
        self._serial = 0
        self._last_request = time.monotonic()
        self._last_busy: dict[int, float] = {}
        self._starting: asyncio.Task[WorkerProcess] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False
        self.failed_message = ""

    # -- the WorkerProcess-like surface ------------------------------------------
    @property
    def state(self) -> str:
        if self.failed_message:
            return "failed"
        if any(r.state == "ready" for r in self.replicas) or self.scaled_to_zero:
            return "ready"
        if self.replicas:
            return self.replicas[0].state
        return "starting"

    @property
    def state_message(self) -> str:
        if self.failed_message:
            return self.failed_message
        if self.scaled_to_zero:
            return "Scaled to zero; the next request starts a replica."
        return self.replicas[0].state_message if self.replicas else ""

    @property
    def outstanding(self) -> int:
        return sum(r.outstanding for r in self.replicas)

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    @property
    def pid(self) -> int | None:
        return self.replicas[0].pid if self.replicas else None

    @property
    def pids(self) -> list[int]:
        return [r.pid for r in self.replicas if r.pid]

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Start ``max(min_replicas, 1)`` replicas; returns when they are ready or failed."""
        self._closed = False
        first = await asyncio.gather(*(self._add_replica()
                                       for _ in range(max(self.min_replicas, 1))))
        bad = [r for r in first if r.state != "ready"]
        if bad and len(bad) == len(first):
            self.failed_message = bad[0].state_message
        self._last_request = time.monotonic()
        if self.min_replicas < self.max_replicas or self.scale_to_zero:
            self._monitor = asyncio.create_task(self._watch(), name=f"pool-{self.name}")

    async def stop(self) -> None:
        self._closed = True
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(BaseException):
                await self._monitor
        await asyncio.gather(*(r.stop() for r in self.replicas), return_exceptions=True)
        self.replicas.clear()

    async def _add_replica(self) -> WorkerProcess:
        self._serial += 1
        log = self.log_path if self._serial == 1 else self.log_path.with_name(
            f"{self.log_path.stem}.replica{self._serial}{self.log_path.suffix}")
        w = WorkerProcess(self.name if self._serial == 1 else f"{self.name}#{self._serial}",
                          self.spec, log, max_queue=self.max_queue)
        self.replicas.append(w)
        self._last_busy[id(w)] = time.monotonic()  # new replicas get a full idle period
        await w.start()
        if w.state == "ready":
            self.info = self.info or dict(w.info)
        else:
            self.replicas.remove(w)
            await w.stop()
            w.state = "failed"
        return w

    def _grow(self) -> asyncio.Task[WorkerProcess]:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._add_replica())
        return self._starting

    async def _watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for r in self.replicas:
                if r.outstanding:
                    self._last_busy[id(r)] = now
                    self._last_request = now  # idle time counts from the last activity
            if self.scale_to_zero and self.replicas and not self.outstanding and \
                    now - self._last_request >= self.idle_timeout_s:
                replicas, self.replicas = self.replicas, []
                self.scaled_to_zero = True
                await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
                continue
            if len(self.replicas) > max(self.min_replicas, 1):
                idle = [r for r in self.replicas[1:] if not r.outstanding and r.state == "ready"
                        and now - self._last_busy.get(id(r), now) >= self.scale_down_after_s]
                if idle:
                    self.replicas.remove(idle[-1])
                    await idle[-1].stop()

    # -- requests -------------------------------------------------------------------
    async def submit(self, op: dict[str, Any]) -> WorkerRequest:
        """Send ``op`` to the least-loaded ready replica (starting one if scaled to zero).

        Raises:
            TemporarilyUnavailable: 503 + Retry-After when no replica can take it.
        """
        self._last_request = time.monotonic()
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready and (self.scaled_to_zero or (self.scale_to_zero and not self.replicas)):
            w = await self._grow()  # cold start: the request waits for the model to load
            self.scaled_to_zero = False
            if w.state != "ready":
                raise TemporarilyUnavailable(
                    f"'{self.name}' could not start a replica: {w.state_message}",
                    retry_after=RESTART_RETRY_AFTER_S)
            ready = [w]
        if not ready:
            if self.replicas:
                return self.replicas[0].submit(op)  # raises the worker's own 503
            raise TemporarilyUnavailable(f"'{self.name}' has no replica running.",
                                         retry_after=RESTART_RETRY_AFTER_S)
        best = min(ready, key=lambda r: r.outstanding)
        if best.outstanding >= self.scale_up_at and len(self.replicas) < self.max_replicas:
            self._grow()
        return best.submit(op)
