"""Structured outputs end to end on the bundled model, over a real-world schema corpus.

Run by hand (not a test)::

    .venv/bin/python bench/bench_structured.py                 # 30 schemas a subset, ~5 min
    .venv/bin/python bench/bench_structured.py --per-subset 5  # smoke run
    .venv/bin/python bench/bench_structured.py --failures      # one line per non-valid answer

The corpus is ``../shared/data/jsonschemabench-dev.jsonl`` beside the repository
(``--corpus``): real-world schemas from JSONSchemaBench's subsets, one JSON object a
line with ``id``, ``subset`` and ``schema``. What it measures, in one run:

1. **Compile** — every corpus schema through what a worker does for a
   ``json_schema`` request (:func:`fmserve.protocol.schemas.load_schema`, then
   :class:`fmserve.engines.grammar.GrammarCompiler` on the bundled model's vocabulary):
   accepted %, and compile time p50 / p99 / max in ms (construction + first mask).
2. **End to end** — a real ``fmserve serve`` (fresh home, bundled SmolLM2), the first
   ``--per-subset`` schemas of each subset, each sent twice with ``temperature: 0``,
   ``max_tokens`` ``--max-tokens`` (384), ``--concurrency`` (8) requests at a time:
   (the prompt asks for a short example and shows the schema's first
   :data:`SCHEMA_IN_PROMPT` characters), as ``response_format: json_schema`` and as
   the parameters of a forced tool
   (``tool_choice: required``). Each answer is one of: **valid** (finished with
   ``stop`` / ``tool_calls`` and validates with ``jsonschema`` under the schema's own
   draft), **length** (cut by
   ``max_tokens``, counted apart; ``length+json`` says how many of those are still a
   valid document; ``valid, steered`` counts valid answers that used at least
   ``max_tokens`` − :data:`STEER_ZONE` tokens, closed by budget steering),
   **refused** (400, reason kept), **reported** (502: finished but
   broke a keyword the grammar does not enforce, after retries), **non-conforming**
   (a 200 answer that does not validate: must be 0) and **5xx** (anything else,
   e.g. 503 from a dead worker: must be 0; a 503 with ``Retry-After`` — the KV cache
   shared by the running requests is full — is retried 3 times first, as the
   ``openai`` client does). The chat worker's pid is read before
   and after: it must not change.
3. **Decode speed** — single stream, tokens/s (decode only: (tokens − 1) / time from
   first to last streamed token) of ``json_schema`` requests vs the same request
   without ``response_format``, alternated, temperature 0.7, ``max_tokens`` 128: on
   ``bench_batching.py``'s small schema (3 reps) and on the 8 largest compiled schemas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from fmserve.client import AsyncClient  # noqa: E402
from fmserve.protocol.schemas import load_schema  # noqa: E402
from fmserve.testing import LocalServer, start_server, stop_server  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from schema_corpus import DEFAULT_CORPUS, load_corpus  # noqa: E402

CHAT = "databricks-smollm2-135m-instruct"
SCHEMA_IN_PROMPT = 400  # characters of the schema shown in the prompt (compact JSON)
OUTCOMES = ("valid", "length", "refused", "reported", "non-conforming", "5xx")


def bench_compile(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accepted/compiled per subset and compile times (ms), in this process."""
    from llama_cpp import Llama

    from fmserve.engines import bundled
    from fmserve.engines.grammar import GrammarCompiler, GrammarError
    from fmserve.errors import InvalidParameterValue

    llm = Llama(model_path=str(bundled.smollm2_gguf()), vocab_only=True, verbose=False)
    comp = GrammarCompiler(llm._model.vocab, llm.n_vocab())
    comp.tokenizer()
    ok: dict[str, list[bool]] = defaultdict(list)
    times: list[float] = []
    reasons: Counter[str] = Counter()
    compiled: list[tuple[int, dict[str, Any]]] = []
    for row in rows:
        try:
            load_schema(row["schema"], "schema")
            t0 = time.perf_counter()
            comp.matcher({"type": "json_schema", "schema": row["schema"]})
            times.append((time.perf_counter() - t0) * 1000)
            ok[row["subset"]].append(True)
            compiled.append((len(json.dumps(row["schema"])), row))
        except (GrammarError, InvalidParameterValue) as exc:
            ok[row["subset"]].append(False)
            reasons[str(exc)[:90]] += 1
    del llm
    times.sort()
    return {"ok": ok, "times": times, "reasons": reasons,
            "largest": [r for _, r in sorted(compiled, key=lambda x: -x[0])[:8]]}


def _body(row: dict[str, Any], form: str, max_tokens: int) -> dict[str, Any]:
    schema_text = json.dumps(row["schema"], separators=(",", ":"))
    if len(schema_text) > SCHEMA_IN_PROMPT:
        schema_text = schema_text[:SCHEMA_IN_PROMPT] + "…"
    body: dict[str, Any] = {"messages": [
        {"role": "system", "content": "You produce realistic, short example data as JSON."},
        {"role": "user", "content": f"Give a short example for '{row['id'].split('/')[-1]}' "
                                    f"following this JSON Schema: {schema_text}"}],
        "max_tokens": max_tokens, "temperature": 0}
    if form == "response_format":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "example", "schema": row["schema"]}}
    else:
        body["tools"] = [{"type": "function", "function": {
            "name": "record", "description": "Record the example", "parameters": row["schema"]}}]
        body["tool_choice"] = "required"
    return body


# A valid answer that used this close to max_tokens was closed by budget steering.
STEER_ZONE = 32


def classify(row: dict[str, Any], form: str, r: httpx.Response,
             max_tokens: int) -> tuple[str, str]:
    """(outcome, detail) of one answer (see module doc)."""
    if r.status_code == 400:
        return "refused", r.json().get("message", "")[:120]
    if r.status_code == 502:
        return "reported", r.json().get("message", "")[:120]
    if r.status_code != 200:
        return "5xx", f"{r.status_code} {r.text[:100]}"
    choice = r.json()["choices"][0]
    msg, finish = choice["message"], choice["finish_reason"]
    if form == "tools" and msg.get("tool_calls"):
        text = msg["tool_calls"][0]["function"]["arguments"]
    else:
        text = msg.get("content") or ""
    try:
        why = load_schema(row["schema"], "schema").violation(json.loads(text))
    except ValueError:
        why = f"not JSON: {text[:60]!r}"
    if finish == "length":
        return "length", "" if why else "json"
    if why:
        return "non-conforming", f"{finish}: {why}"[:120]
    used = (r.json().get("usage") or {}).get("completion_tokens", 0)
    return "valid", "steered" if used >= max_tokens - STEER_ZONE else ""


async def bench_e2e(srv: LocalServer, rows: list[dict[str, Any]], forms: list[str],
                    max_tokens: int, concurrency: int) -> list[tuple[str, str, str, str, str]]:
    results: list[tuple[str, str, str, str, str]] = []
    # 503 with Retry-After (KV cache full) is retried, as the openai client does.
    async with AsyncClient(srv.url, srv.token, timeout=600,
                           max_concurrency=concurrency) as api:
        async def one(row: dict[str, Any], form: str) -> None:
            t0 = time.perf_counter()
            r = await api.send("POST", f"/serving-endpoints/{CHAT}/invocations",
                               json=_body(row, form, max_tokens))
            took = time.perf_counter() - t0
            outcome, detail = classify(row, form, r, max_tokens)
            results.append((row["subset"], row["id"], form, outcome, detail))
            progress.advance(task)
            if took > 30:
                progress.console.print(f"slow: {row['id']} {form} {took:.0f} s {outcome}")

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as progress:
            task = progress.add_task("end to end", total=len(rows) * len(forms))
            await asyncio.gather(*(one(row, form) for row in rows for form in forms))
    return results


SMALL = {"id": "small/person", "schema": {  # bench_batching.py's schema
    "type": "object", "required": ["name", "age", "hobbies", "city"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                   "city": {"type": "string",
                            "enum": ["Paris", "London", "Tokyo", "New York", "Lima"]}}}}


def bench_speed(srv: LocalServer, largest: list[dict[str, Any]],
                reps: int = 3) -> dict[str, tuple[float, float]]:
    """Median decode tok/s, (json_schema, the same request unconstrained), per case."""
    def run(body: dict[str, Any]) -> float | None:
        stamps: list[float] = []
        url = f"/serving-endpoints/{CHAT}/invocations"
        with srv.client(timeout=600) as http, \
                http.stream("POST", url, json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data:") and line != "data: [DONE]":
                    chunk = json.loads(line[5:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 8 else None

    out = {}
    for case, rows in (("small schema", [SMALL] * reps), ("8 largest schemas", largest)):
        free, constrained = [], []
        for row in rows:
            body = {**_body(row, "response_format", 128), "temperature": 0.7}
            c = run(body)
            f = run({k: v for k, v in body.items() if k != "response_format"})
            if c and f:
                constrained.append(c)
                free.append(f)
        out[case] = (statistics.median(constrained) if constrained else 0.0,
                     statistics.median(free) if free else 0.0)
    return out


def pct(n: int, d: int) -> str:
    return f"{100 * n / d:.0f} %" if d else "-"


def report(comp: dict[str, Any], results: list[tuple[str, str, str, str, str]],
           speed: dict[str, tuple[float, float]], pids: tuple[int, int],
           failures: bool) -> None:
    times = comp["times"]
    print("\n## Compile (load_schema + llguidance, bundled vocabulary)\n")
    print("| subset | schemas | accepted and compiled |\n|---|---|---|")
    all_ok = [x for v in comp["ok"].values() for x in v]
    for subset, oks in comp["ok"].items():
        print(f"| {subset} | {len(oks)} | {pct(sum(oks), len(oks))} |")
    print(f"| **all** | {len(all_ok)} | **{pct(sum(all_ok), len(all_ok))}** |")
    if times:
        p = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        print(f"\ncompile ms: p50 {p(0.5):.1f}, p99 {p(0.99):.1f}, max {times[-1]:.1f} "
              f"(n={len(times)})")
    for reason, n in comp["reasons"].most_common(8):
        print(f"  refused x{n}: {reason}")
    for form in sorted({r[2] for r in results}):
        rows = [r for r in results if r[2] == form]
        print(f"\n## End to end, {form} (temperature 0)\n")
        print("| subset | n | " + " | ".join(OUTCOMES) + " | length+json | valid, steered |")
        print("|---|---|" + "---|" * (len(OUTCOMES) + 2))
        by: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for r in rows:
            by[r[0]].append(r)
        for subset, rs in [*by.items(), ("**all**", rows)]:
            c = Counter(r[3] for r in rs)
            lj = sum(1 for r in rs if r[3] == "length" and r[4] == "json")
            st = sum(1 for r in rs if r[3] == "valid" and r[4] == "steered")
            print(f"| {subset} | {len(rs)} | " + " | ".join(pct(c[o], len(rs)) for o in OUTCOMES)
                  + f" | {lj} | {st} |")
        if failures:
            for r in rows:
                if r[3] != "valid" or r[4]:
                    print(f"  {r[3]:<15} {r[1]:<60} {r[4]}")
    finished = [r for r in results if r[3] in ("valid", "non-conforming")]
    valid = sum(r[3] == "valid" for r in finished)
    print(f"\nfinished answers that validate: {pct(valid, len(finished))} "
          f"({len(finished)} finished)")
    print(f"chat worker pid before / after: {pids[0]} / {pids[1]}"
          f" ({'same' if pids[0] == pids[1] else 'RESTARTED'})")
    print("\n## Decode speed, 1 stream, temperature 0.7\n")
    print("| case | json_schema tok/s | same request unconstrained | ratio |\n|---|---|---|---|")
    for case, (c, f) in speed.items():
        print(f"| {case} | {c:.1f} | {f:.1f} | {100 * c / f:.1f} % |" if f else f"| {case} | - |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--per-subset", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--forms", default="response_format,tools")
    ap.add_argument("--failures", action="store_true")
    ap.add_argument("--no-speed", action="store_true", help="skip the decode-speed section")
    args = ap.parse_args()
    if not args.corpus.exists():
        print(f"corpus not found: {args.corpus}", file=sys.stderr)
        return 2
    rows = load_corpus(args.corpus)
    comp = bench_compile(rows)
    picked = load_corpus(args.corpus, args.per_subset)
    with tempfile.TemporaryDirectory(prefix="fmserve-bench-so-") as tmp:
        srv = start_server(Path(tmp))
        try:
            def pid() -> int:
                return next(w["pid"] for w in srv.health()["workers"] if w["entity"] == CHAT)
            before = pid()
            t0 = time.perf_counter()
            results = asyncio.run(bench_e2e(srv, picked, args.forms.split(","),
                                            args.max_tokens, args.concurrency))
            print(f"end to end: {len(results)} requests in {time.perf_counter() - t0:.0f} s")
            after = pid()
            speed = {} if args.no_speed else bench_speed(srv, comp["largest"])
        finally:
            stop_server(srv)
    report(comp, results, speed, (before, after), args.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
