"""Inference tables (and keyword + PII guardrails) on versus off, in one run.

Run by hand (not a test)::

    .venv/bin/python bench/bench_tables.py [--duration 5] [--rounds 3] [--conns 32]
                                           [--delay-requests 200]

One ``fmserve serve --no-bundled`` in front of ``bench/fake_upstream.py`` (the raw asyncio
upstream of ``bench_gateway.py``), four endpoints on the same upstream:

* ``off``: no AI Gateway config (no request-log record at all);
* ``usage``: ``usage_tracking_config`` only (the request log's durable append, fsync'd
  group commit: the baseline the tables build on);
* ``tables``: ``inference_table_config`` + ``usage_tracking_config`` enabled (the request
  log's record carries both bodies; the background materialiser writes Delta tables);
* ``tables+guard``: the same plus input and output guardrails ``invalid_keywords`` (5
  words) and ``pii: {behavior: MASK}``.

Cases, all with a ~1 KB chat prompt (no PII, no keyword: the guardrails scan and pass),
non-streaming, loaded by ``wrk`` (Debian package ``wrk``): ``p50 @1`` (one connection) and
``req/s @N``; the variants alternate ``--rounds`` times and the median is reported, with
"added p50" = variant − the upstream loaded directly (same wrk, same body).

Then the **delay from response to row readable** on ``tables``: ``--delay-requests``
requests at ~20/s, each with its own ``client_request_id``; a reader polls the Delta
table every 20 ms (``deltalake``: new files since the last version, their
``client_request_id`` column) and notes when each row first appears; the delay is that
minus the time the client had the whole response. p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as bg  # noqa: E402  (the upstream, endpoint and wrk helpers)

from fmserve.testing import start_server  # noqa: E402

PROMPT = ("Summarise the following notes for the weekly report. " +
          "The team shipped the new ingestion pipeline and fixed three bugs. " * 14)[:1000]
GUARD = {"invalid_keywords": ["kumquat", "zeppelin", "xylophone", "quokka", "marzipan"],
         "pii": {"behavior": "MASK"}}
VARIANTS = {
    "off": None,
    "usage": {"usage_tracking_config": {"enabled": True}},  # the request log alone
    "tables": {"inference_table_config": {"catalog_name": "bench", "schema_name": "logs",
                                          "enabled": True},
               "usage_tracking_config": {"enabled": True}},
    "tables+guard": {"inference_table_config": {"catalog_name": "bench",
                                                "schema_name": "logs", "enabled": True},
                     "usage_tracking_config": {"enabled": True},
                     "guardrails": {"input": GUARD, "output": GUARD}},
}


def body(model: str, cid: str | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": PROMPT}],
                         "max_tokens": 32}
    if cid:
        b["client_request_id"] = cid
    return b


def delay(srv: Any, name: str, n: int) -> list[float]:
    """Seconds from each response's last byte to its row being readable."""
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    uri = str(srv.data_dir / "tables" / "bench" / "logs" / f"{name}_payload")
    done: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def reader() -> None:
        table = DeltaTable(uri)
        known: set[str] = set(table.file_uris())
        while not stop.is_set():
            table.update_incremental()
            files = set(table.file_uris())
            for f in files - known:
                for cid in pq.read_table(f, columns=["client_request_id"]).column(0).to_pylist():
                    seen.setdefault(cid, time.monotonic())
            known = files
            time.sleep(0.02)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as c:
        for _ in range(n):
            cid = uuid.uuid4().hex
            r = c.post("/serving-endpoints/chat/completions", json=body(name, cid))
            r.raise_for_status()
            done[cid] = time.monotonic()
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while not set(done) <= set(seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join()
    missing = set(done) - set(seen)
    if missing:
        raise RuntimeError(f"{len(missing)} rows never appeared")
    return sorted(seen[c] - done[c] for c in done)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--delay-requests", type=int, default=200)
    ap.add_argument("--sync", default="fsync", choices=("fsync", "write"),
                    help="FMSERVE_REQUEST_LOG_SYNC of the server")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    up, upstream = bg.start_upstream(tmp)
    srv = start_server(tmp / "fmserve", env_extra={"FMSERVE_REQUEST_LOG_SYNC": args.sync},
                       serve_args=("--no-bundled",))
    try:
        for v, gw in VARIANTS.items():
            bg.create_endpoint(srv, f"bench-{v.replace('+', '-')}", upstream, gw)
        url = srv.url + "/serving-endpoints/chat/completions"
        direct = upstream + "/v1/chat/completions"
        res: dict[str, dict[str, list[float]]] = {v: {"p50": [], "rps": []}
                                                  for v in ["direct", *VARIANTS]}
        for _ in range(args.rounds):
            res["direct"]["p50"].append(bg.wrk(direct, {}, body(bg.MODEL), 1, args.duration,
                                               tmp)["p50_us"] / 1000)
            for v in VARIANTS:
                model = f"bench-{v.replace('+', '-')}"
                one = bg.wrk(url, srv.headers, body(model), 1, args.duration, tmp)
                many = bg.wrk(url, srv.headers, body(model), args.conns, args.duration, tmp)
                if one["status_errors"] or many["status_errors"]:
                    raise RuntimeError(f"{v}: HTTP errors under load")
                res[v]["p50"].append(one["p50_us"] / 1000)
                res[v]["rps"].append(many["rps"])
        base = statistics.median(res["direct"]["p50"])
        print(f"request log sync: {args.sync}")
        print(f"direct upstream p50 @1: {base:.3f} ms (median of {args.rounds} rounds)")
        print(f"{'variant':14} {'p50 @1 ms':>10} {'added p50 ms':>13} "
              f"{'req/s @' + str(args.conns):>11}")
        for v in VARIANTS:
            p50 = statistics.median(res[v]["p50"])
            rps = statistics.median(res[v]["rps"])
            print(f"{v:14} {p50:10.3f} {p50 - base:13.3f} {rps:11.0f}")
        d = delay(srv, "bench-tables", args.delay_requests)
        print(f"response → row readable ({len(d)} requests): p50 {pct(d, 50) * 1000:.0f} ms, "
              f"p99 {pct(d, 99) * 1000:.0f} ms, max {d[-1] * 1000:.0f} ms")
        print(json.dumps({"rounds": res, "delay_s": {"p50": pct(d, 50), "p99": pct(d, 99)}}))
    finally:
        bg.terminate(srv)
        bg._stopper(up)()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
