"""Serving-endpoint benchmark: provisioned-throughput replicas and scale-to-zero cold start.

Run by hand (not a test)::

    .venv/bin/python bench/bench_serving.py [--streams 8] [--max-tokens 64] [--rounds 3]

It starts a real ``fmserve serve`` (like bench_core.py), then creates endpoints on the
bundled SmolLM2 through the management API and measures:

* aggregate decode tokens/s at ``--streams`` concurrent SSE streams for one
  provisioned-throughput endpoint pinned to 1 replica (min = max = 1 chunk) and to
  2 replicas (min = max = 2 chunks); each replica gets cores // replicas threads;
* the cold start of a scale-to-zero endpoint: time from the request to the first
  token after its workers stopped (``FMSERVE_SCALE_TO_ZERO_IDLE_S=2``), next to the
  same request when warm.

Prints a table (rich). Units: tokens/s, ms. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import TOPICS, Stream, chat_body, start_server, stop_server  # noqa: E402

from fmserve.testing import LocalServer  # noqa: E402

console = Console()
MODEL = "system.ai.smollm2-135m-instruct"


async def _stream(client: httpx.AsyncClient, endpoint: str, body: dict) -> Stream:  # type: ignore[type-arg]
    s = Stream(time.perf_counter())
    async with client.stream("POST", f"/serving-endpoints/{endpoint}/invocations",
                             json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            n = (orjson.loads(line[6:]).get("usage") or {}).get("completion_tokens") or 0
            if n > s.tokens:
                now = time.perf_counter()
                s.tokens, s.t_last = n, now
                if s.t_first is None:
                    s.t_first = now
    return s


async def _round(srv: LocalServer, endpoint: str, streams: int,
                 max_tokens: int, round_no: int) -> float:
    async with srv.async_client(timeout=600, connections=streams + 2) as client:
        bodies = [chat_body(f"Write a long story about {TOPICS[(round_no + i) % len(TOPICS)]}.",
                            max_tokens) for i in range(streams)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(_stream(client, endpoint, b) for b in bodies))
        return sum(s.tokens for s in done) / (time.perf_counter() - t0)


def _create(c: httpx.Client, name: str, entity: dict) -> None:  # type: ignore[type-arg]
    r = c.post("/api/2.0/serving-endpoints", json={"name": name, "config": {
        "served_entities": [{"name": "smol", "entity_name": MODEL, "entity_version": "1",
                             **entity}]}})
    r.raise_for_status()
    while c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]["config_update"] == \
            "IN_PROGRESS":
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    os.environ["FMSERVE_SCALE_TO_ZERO_IDLE_S"] = "2"
    with tempfile.TemporaryDirectory(prefix="fmserve-bench-") as tmp:
        srv = start_server(Path(tmp), threads=0)
        try:
            with srv.client(timeout=600) as c:
                chunk = c.get("/api/2.0/serving-endpoints/get-model-optimization-info/"
                              f"{MODEL}/1").json()["throughput_chunk_size"]
                for replicas in (1, 2):
                    name = f"pt-{replicas}"
                    _create(c, name, {"min_provisioned_throughput": replicas * chunk,
                                      "max_provisioned_throughput": replicas * chunk})
                    asyncio.run(_round(srv, name, 2, 8, 99))  # warm-up
                    tps = [asyncio.run(_round(srv, name, args.streams,
                                              args.max_tokens, r)) for r in range(args.rounds)]
                    med = statistics.median(tps)
                    console.log(f"{replicas} replica(s): {med:.1f} tok/s at {args.streams} "
                                f"streams ({', '.join(f'{t:.1f}' for t in tps)})")
                    rows.append((f"PT endpoint, {replicas} replica(s), {args.streams} streams",
                                 f"{med:.1f} tokens/s"))
                    c.delete(f"/api/2.0/serving-endpoints/{name}")
                _create(c, "stz", {"scale_to_zero_enabled": True})
                body = chat_body("Say hello.", 8)
                warm = asyncio.run(_one(srv, "stz", body))
                cold = []
                for _ in range(args.rounds):
                    while not any(w["entity"].startswith("stz/") and w["replicas"] == 0
                                  for w in srv.health()["workers"]):
                        time.sleep(0.2)
                    cold.append(asyncio.run(_one(srv, "stz", body)))
                rows.append(("scale-to-zero cold start, request → first token",
                             f"{statistics.median(cold):.0f} ms (warm: {warm:.0f} ms)"))
        finally:
            stop_server(srv)
    table = Table("metric", "value", title="fmserve serving endpoints")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    return 0


async def _one(srv: LocalServer, endpoint: str, body: dict) -> float:  # type: ignore[type-arg]
    async with srv.async_client(timeout=600) as client:
        s = await _stream(client, endpoint, body)
    return s.ttft_ms


if __name__ == "__main__":
    sys.exit(main())
