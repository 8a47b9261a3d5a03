"""Guardrails cost: keyword + PII guardrails on versus off, same server, same run.

Run by hand (not a test)::

    .venv/bin/python bench/bench_guardrails.py [--duration 8] [--conns 32] [--rounds 3]

One ``fmserve serve --no-bundled`` in front of ``bench/fake_upstream.py`` (see
``bench_gateway.py``) with two endpoints on the same upstream: ``g-off`` (no guardrails)
and ``g-on`` (input and output ``invalid_keywords`` and ``pii: MASK``). The request is a
1 KB chat prompt (prose with numbers, no PII: the common case); a second ``g-on`` case
sends the same prompt with an e-mail address and a phone number in it (masked before the
upstream sees it). wrk measures p50 at 1 connection and req/s at ``--conns`` connections,
non-streaming and streaming, alternating off/on ``--rounds`` times; the table shows
medians and the added p50 (on − off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import create_endpoint, start_upstream, terminate, wrk  # noqa: E402

from fmserve.testing import start_server  # noqa: E402

PROSE = ("Our quarterly planning meeting covered the roadmap for 2025, the migration of 14 "
         "services to the new cluster, and the budget of 250 thousand for tooling. ")
PROMPT = (PROSE * 8)[:1024]
PII_PROMPT = PROMPT[:960] + " Mail jane.doe@example.com or call +1 415-555-0100."
GUARDRAILS = {side: {"invalid_keywords": ["password", "secret", "confidential"],
                     "pii": {"behavior": "MASK"}} for side in ("input", "output")}


def body(model: str, prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32, **({"stream": True} if stream else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    upstream, url = start_upstream(tmp)
    srv = start_server(tmp / "fmserve", serve_args=("--no-bundled",))
    try:
        create_endpoint(srv, "g-off", url)
        create_endpoint(srv, "g-on", url, {"guardrails": GUARDRAILS})
        target = srv.url + "/serving-endpoints/chat/completions"
        with httpx.Client(headers=srv.headers, timeout=30) as c:  # warm-up and sanity
            for model, prompt in (("g-off", PROMPT), ("g-on", PROMPT), ("g-on", PII_PROMPT)):
                r = c.post(target, json=body(model, prompt, False))
                assert r.status_code == 200, r.text
        cases = [("off", "g-off", PROMPT), ("on", "g-on", PROMPT),
                 ("on, PII masked", "g-on", PII_PROMPT)]
        res: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for label, model, prompt in cases:
                for stream in (False, True):
                    kind = "stream" if stream else "plain"
                    b = body(model, prompt, stream)
                    one = wrk(target, srv.headers, b, 1, args.duration, tmp)
                    many = wrk(target, srv.headers, b, args.conns, args.duration, tmp)
                    if one["status_errors"] or many["status_errors"]:
                        raise RuntimeError(f"{label} {kind}: HTTP errors under load")
                    res.setdefault((label, kind + " p50"), []).append(one["p50_us"] / 1000)
                    res.setdefault((label, kind + " rps"), []).append(many["rps"])
    finally:
        terminate(srv)
        upstream.terminate()
    med = {k: statistics.median(v) for k, v in res.items()}
    t = Table(title=f"guardrails (keywords + PII MASK, input and output), 1 KB prompt, "
                    f"median of {args.rounds} rounds")
    for col in ("case", "p50 @1 ms", "added p50 ms", f"req/s @{args.conns}", "req/s vs off",
                "stream p50 @1 ms", "stream added ms", f"stream req/s @{args.conns}"):
        t.add_column(col, justify="right")
    for label, _, _ in cases:
        t.add_row(label, f"{med[(label, 'plain p50')]:.2f}",
                  f"{med[(label, 'plain p50')] - med[('off', 'plain p50')]:+.2f}",
                  f"{med[(label, 'plain rps')]:.0f}",
                  f"{med[(label, 'plain rps')] / med[('off', 'plain rps')] - 1:+.1%}",
                  f"{med[(label, 'stream p50')]:.2f}",
                  f"{med[(label, 'stream p50')] - med[('off', 'stream p50')]:+.2f}",
                  f"{med[(label, 'stream rps')]:.0f}")
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
