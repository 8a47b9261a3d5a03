"""Entry point of a worker process: ``python -m fmserve.engines.worker_main``.

Arguments: ``--fd N`` (the socket inherited from the server) and ``--spec JSON``
(``{"engine": "llama_cpp" | "sentence_transformers", ...engine options}``).

One reader thread takes frames off the socket: ``cancel`` marks a request
cancelled at once, everything else joins the inbox. The main thread runs the
engine: its own scheduling loop (``run``, continuous batching), batches of queued
requests (``handle_batch``, dynamic batching), or one request at a time (``handle``).
When the server goes away (socket EOF) the worker exits; on Linux it also asks the
kernel for SIGKILL when its parent dies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import orjson

from fmserve.engines.ipc import BlockingChannel


class CancelSet:
    """Ids of requests the server no longer wants (client gone)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, rid: str) -> None:
        with self._lock:
            self._ids.add(rid)

    def pop(self, rid: str) -> bool:
        with self._lock:
            if rid in self._ids:
                self._ids.discard(rid)
                return True
            return False

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def load_engine(spec: dict[str, Any]) -> Any:
    kind = spec["engine"]
    if kind == "llama_cpp":
        if int(spec.get("max_seqs") or 1) > 1:
            from fmserve.engines.llama_batched import BatchedLlamaEngine

            return BatchedLlamaEngine(spec)
        from fmserve.engines.llama_engine import LlamaEngine

        return LlamaEngine(spec)
    if kind == "scripted":
        from fmserve.engines.scripted import ScriptedEngine

        return ScriptedEngine(spec)
    if kind == "sentence_transformers":
        from fmserve.engines.embed_engine import EmbeddingEngine

        return EmbeddingEngine(spec)
    raise ValueError(f"unknown engine {kind!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    chan = BlockingChannel(socket.socket(fileno=args.fd))
    try:
        engine = load_engine(orjson.loads(args.spec))
    except Exception as exc:  # report the loader's message, then exit
        traceback.print_exc()
        chan.send({"t": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    chan.send({"t": "ready", "info": engine.info()})
    print(f"worker ready: {engine.info()}", flush=True)

    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancelled = CancelSet()

    def reader() -> None:
        while True:
            msg = chan.recv()
            if msg is None:  # server gone
                os._exit(0)
            if msg.get("op") == "cancel":
                cancelled.add(msg["id"])
            else:
                inbox.put(msg)

    threading.Thread(target=reader, name="fmserve-reader", daemon=True).start()
    if hasattr(engine, "run"):  # the engine schedules requests itself (continuous batching)
        engine.run(inbox, cancelled, chan.send)
        return 0
    if hasattr(engine, "handle_batch"):  # dynamic batching
        _batch_loop(engine, inbox, cancelled, chan.send)
        return 0
    while True:
        msg = inbox.get()
        if msg is None:
            return 0
        if cancelled.pop(msg["id"]):
            continue
        rid = msg["id"]
        try:
            engine.handle(msg, chan.send, lambda rid=rid: rid in cancelled)
        except Exception as exc:
            traceback.print_exc()
            chan.send({"t": "err", "id": rid, "code": "INTERNAL_ERROR",
                       "message": f"{type(exc).__name__}: {exc}"})
        cancelled.pop(rid)


def _batch_loop(engine: Any, inbox: queue.Queue[dict[str, Any] | None], cancelled: CancelSet,
                send: Any) -> None:
    """Takes a batch off the inbox, runs it, repeats.

    One loop: with two (one batch computing while the next gathers), 32 one-text
    clients split into batches of ~16 that ran less efficiently and were slower in
    all: 262 against 297 texts/s (``bench/bench_batching.py``'s embeddings row).
    """
    while True:
        msg = inbox.get()
        if msg is None:
            return
        if cancelled.pop(msg["id"]):
            continue
        batch = _gather_batch(msg, inbox, cancelled, engine.max_batch, engine.max_wait_s)
        try:
            engine.handle_batch(batch, send)
        except Exception as exc:
            traceback.print_exc()
            for m in batch:
                send({"t": "err", "id": m["id"], "code": "INTERNAL_ERROR",
                      "message": f"{type(exc).__name__}: {exc}"})


def _gather_batch(first: dict[str, Any], inbox: queue.Queue[dict[str, Any] | None],
                  cancelled: CancelSet, max_items: int, max_wait_s: float) -> list[dict[str, Any]]:
    """``first`` plus requests that arrive within ``max_wait_s`` (up to ``max_items`` inputs).

    Dynamic batching: concurrent single-text embedding requests share one forward pass.
    """
    batch, size = [first], len(first.get("texts", ()))
    start = time.monotonic()
    deadline = start + max_wait_s
    while size < max_items:
        try:
            nxt = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if nxt is None:
            inbox.put(None)
            break
        if cancelled.pop(nxt["id"]):
            continue
        batch.append(nxt)
        size += len(nxt.get("texts", ()))
        # Requests still arriving: wait another max_wait_s after each, up to 8x in all.
        deadline = min(time.monotonic() + max_wait_s, start + 8 * max_wait_s)
    return batch


if __name__ == "__main__":
    sys.exit(main())
