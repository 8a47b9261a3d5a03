"""A fake provider server: a Starlette app on 127.0.0.1 in a background thread.

Every request is recorded (:class:`Recorded`) so tests can assert the exact outbound
request (method, path, query, headers, JSON body) fmserve sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute

from fmserve.testing import free_port


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer_port: int = 0  # the client's TCP port: one per connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeServer:
    """Run ``routes`` on a free port; ``requests`` holds what arrived, in order.

    ``keep_alive_s``: how long an idle connection stays open (uvicorn's default, 5 s).
    """

    routes: list[BaseRoute]
    requests: list[Recorded] = field(default_factory=list)
    port: int = 0
    keep_alive_s: int = 5

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def record(self, request: Request) -> Recorded:
        rec = Recorded(request.method, request.url.path, dict(request.query_params),
                       {k.lower(): v for k, v in request.headers.items()}, await request.body(),
                       request.client.port if request.client else 0)
        self.requests.append(rec)
        return rec

    def last(self) -> Recorded:
        assert self.requests, "the fake provider received no request"
        return self.requests[-1]

    def start(self) -> FakeServer:
        self.port = free_port()
        app = Starlette(routes=self.routes)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off", timeout_keep_alive=self.keep_alive_s)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake provider server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def sleep_forever() -> None:
    """What a fake does to simulate a provider that never answers (timeout tests)."""
    await asyncio.sleep(3600)
