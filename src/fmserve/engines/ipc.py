"""Frames between the server and a worker process: 4-byte big-endian length + JSON.

Parent → worker ops::

    {"op": "generate", "id": str, "messages": [...] | "prompt": str, "params": {...}}
    {"op": "embed", "id": str, "texts": [str]}
    {"op": "cancel", "id": str}

Worker → parent events (``t`` is the event type)::

    {"t": "ready", "info": {...}}                     once, after the model loaded
    {"t": "start", "id", "prompt_tokens": int}        prompt accepted (tokens)
    {"t": "tok", "id", "text": str, "n": int}         new text; n = tokens generated so far
    {"t": "end", "id", "finish_reason": str, "prompt_tokens": int, "completion_tokens": int}
    {"t": "emb", "id", "b64": str, "dim": int, "count": int, "prompt_tokens": int}
    {"t": "err", "id", "code": str, "message": str}
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import orjson

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


def encode(msg: dict[str, Any]) -> bytes:
    body = orjson.dumps(msg)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """Next frame, or ``None`` at end of stream (the peer exited)."""
    try:
        head = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME_BYTES:
            return None
        return orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class BlockingChannel:
    """The worker's side: blocking reads, thread-safe writes on one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rfile = sock.makefile("rb")
        self._lock = threading.Lock()

    def recv(self) -> dict[str, Any] | None:
        head = self._rfile.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack(head)
        body = self._rfile.read(size)
        if len(body) < size:
            return None
        return orjson.loads(body)

    def send(self, msg: dict[str, Any]) -> None:
        data = encode(msg)
        with self._lock:
            self._sock.sendall(data)
