"""fmserve batching benchmark: concurrent chat streams, concurrent embeddings, grammars.

Run by hand (not a test)::

    .venv/bin/python bench/bench_batching.py            # full run, several minutes
    .venv/bin/python bench/bench_batching.py --quick    # smoke run, under 2 minutes

Needs the ``bench`` extra for the llama-cpp-python server baseline
(``pip install -c constraints.txt -e ".[bench]"``; or pass ``--skip-llama-server``).
Everything runs in one process tree on the same model files and thread count
(``--threads``, default 2); only one server is up at a time. Helpers (server start,
SSE timing, concurrency rounds, direct embeddings, machine info) come from
``bench_core.py``; the definitions below are the same as there.

1. **Chat, concurrent streams** - SmolLM2-135M-Instruct as the bundled endpoint
   serves it (a BF16 or Q8_0 copy of the shipped Q4_1 GGUF; ``--weights gguf`` for the
   4-bit file itself, ``--gguf`` for another model), every chat row on that same file,
   at 1, 4, 8 and 16 concurrent streaming requests (asyncio + ``httpx.AsyncClient``,
   distinct prompts, ``--temperature`` (default 0.7: sampled, as chat traffic is;
   both servers then reuse the cached chat-template prefix), ``max_tokens`` = N):
   aggregate tokens/s = all tokens / wall time of the round (prefill included), and
   p50 time-to-first-token over the streams.

   *fmserve*: ``fmserve serve`` (``FMSERVE_LLAMA_THREADS=T``, continuous batching of
   up to ``FMSERVE_LLAMA_MAX_SEQS`` = 8 sequences; beyond that requests queue);
   tokens counted from the chunks' cumulative ``usage.completion_tokens``.

   *llama_cpp.server*: llama-cpp-python's own OpenAI-compatible server
   (``python -m llama_cpp.server --model <gguf> --n_threads T --n_ctx 8192``, the
   same venv), which serves one request at a time (``--interrupt_requests False``
   so a queued request waits instead of cutting the running stream short);
   ``POST /v1/chat/completions`` with ``stream: true``; one token per content chunk.
   Target: fmserve aggregate at 8 streams >= 2.5x its aggregate at 1 stream.

2. **Embeddings, one text per request** - all-MiniLM-L6-v2, 32 concurrent clients
   (aiohttp, one pool of 32 connections, orjson) each POSTing
   ``{"input": "<one sentence>"}`` to ``/serving-endpoints/databricks-all-minilm-l6-v2/
   invocations`` until ``--texts`` texts are embedded; texts/s. Baseline: one direct
   ``SentenceTransformer(folder, device="cpu").encode(texts, batch_size=64)`` call
   (torch threads = T) in a fresh process *before* the server starts. The client
   shares the cores with the server, so its cost is part of the number.
   Target: fmserve >= 80 % of the direct batched rate.

3. **Grammar-constrained generation** - one stream through fmserve, temperature 0.7,
   ``max_tokens`` = 1.5 N, a prompt asking for a person as JSON, with
   ``response_format: json_schema`` (strict; name, age, hobbies, city enum) versus
   the same request without it; decode tokens/s = (tokens - 1) / (t_last - t_first),
   median over ``--reps`` after one warm-up each. Target: constrained >= 70 %.

Other load on the machine competes for the cores: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich import box
from rich.table import Table

from fmserve.engines import bundled, weights
from fmserve.engines.weights import check_weights
from fmserve.testing import LocalServer, free_port, wait_until_up

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import (  # noqa: E402
    CHAT,
    EMBED,
    N_CTX,
    Results,
    Stream,
    bench_concurrency,
    bench_direct_embed,
    bundled_weights,
    chat_body,
    console,
    embed_texts,
    isolated,
    machine_info,
    median,
    served_stream,
    start_server,
    stop_server,
)

LEVELS = (1, 4, 8, 16)
CLIENTS = 32
JSON_PROMPT = ("Describe a fictional person as a JSON object with the fields name, age, "
               "hobbies (a list of strings) and city. Answer with the JSON only.")
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo", "New York", "Lima"]},
    },
    "required": ["name", "age", "hobbies", "city"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}


def chat_endpoint(srv: LocalServer, gguf: str, weights_type: str,
                  timeout_s: float = 300) -> str:
    """The invocations path serving ``gguf`` as ``weights_type`` (FMSERVE_LLAMA_WEIGHTS):
    the bundled chat endpoint when that is what it serves, else a new endpoint (created
    through the management API, ready when this returns)."""
    if Path(gguf) == bundled.smollm2_gguf() and weights_type == bundled_weights():
        return f"/serving-endpoints/{CHAT}/invocations"
    name = "bench-gguf"
    with srv.client(timeout=60) as c:
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": name, "config": {"served_entities": [{
                "entity_name": gguf,
                "environment_vars": {"FMSERVE_LLAMA_WEIGHTS": weights_type}}]}})
        r.raise_for_status()
        deadline = time.monotonic() + timeout_s
        while c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]["ready"] != "READY":
            if time.monotonic() > deadline:
                raise RuntimeError(f"endpoint {name} for {gguf} not ready in {timeout_s} s")
            time.sleep(0.5)
    return f"/serving-endpoints/{name}/invocations"


# -- the kernel's own ceiling -------------------------------------------------------
def bench_decode_kernel(threads: int, steps: int, gguf: str) -> dict[int, float]:
    """tokens/s of bare ``llama_decode`` steps carrying one token for each of B
    sequences (B in LEVELS), in this process, no sampling, no server: the most any
    continuous-batching engine can get out of llama.cpp's CPU kernels for this model.
    Run via ``isolated`` (a fresh process)."""
    import llama_cpp
    from llama_cpp import Llama, _internals

    llm = Llama(model_path=gguf, n_ctx=256, n_threads=threads,
                verbose=False)
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = 4096, 512, 512
    p.n_seq_max, p.kv_unified = max(LEVELS), True
    p.n_threads = p.n_threads_batch = threads
    ctx = _internals.LlamaContext(model=llm._model, params=p, verbose=False)
    mem = llama_cpp.llama_get_memory(ctx.ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def step(n_seqs: int, pos: int) -> None:
        for i in range(n_seqs):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = 100 + i, pos, 1
            batch.seq_id[i][0], batch.logits[i] = i, 1
        batch.n_tokens = n_seqs
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    out = {}
    for n_seqs in LEVELS:
        llama_cpp.llama_memory_clear(mem, True)
        step(n_seqs, 0)
        t = time.perf_counter()
        for pos in range(1, steps + 1):
            step(n_seqs, pos)
        out[n_seqs] = n_seqs * steps / (time.perf_counter() - t)
        console.log(f"llama_decode alone, {n_seqs} sequences/step: {out[n_seqs]:.0f} tok/s")
    return out


# -- llama-cpp-python's server -----------------------------------------------------
def _on_openai_line(s: Stream, line: str) -> None:
    """llama_cpp.server chunks carry no usage: one content delta = one token."""
    if not line.startswith("data: ") or line.startswith("data: [DONE]"):
        return
    chunk = orjson.loads(line[6:])
    if "error" in chunk:
        raise RuntimeError(f"error in stream: {chunk}")
    choices = chunk.get("choices") or [{}]
    if (choices[0].get("delta") or {}).get("content"):
        now = time.perf_counter()
        s.tokens += 1
        if s.t_first is None:
            s.t_first = now
        s.t_last = now


def start_llama_server(tmp: Path, threads: int, gguf: str,
                       timeout_s: float = 120) -> LocalServer:
    """``python -m llama_cpp.server`` on a free port, with an API key; once it answers."""
    token, port = secrets.token_hex(16), free_port()
    log_path = tmp / f"llama-server-{port}.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf,
           "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", str(N_CTX), "--host", "127.0.0.1", "--port", str(port),
           "--api_key", token, "--interrupt_requests", "False", "--verbose", "False"]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = LocalServer(f"http://127.0.0.1:{port}", token, tmp, proc, log_path)
    return wait_until_up(srv, "/v1/models", timeout_s, "llama_cpp.server", srv.headers)


# -- embeddings: one text per request, many clients ---------------------------------
async def _embed_singles(srv: LocalServer, texts: list[str], clients: int) -> tuple[float, float]:
    """(texts/s, p50 latency ms) for ``clients`` workers sharing one iterator of texts."""
    url = f"{srv.url}/serving-endpoints/{EMBED}/invocations"
    headers = {**srv.headers, "Content-Type": "application/json"}
    lat: list[float] = []
    todo = iter(texts)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            for text in todo:  # shared iterator: each text is sent once
                t = time.perf_counter()
                async with session.post(url, data=orjson.dumps({"input": text})) as r:
                    raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {raw[:500]!r}")
                data = orjson.loads(raw)["data"]
                assert len(data) == 1 and len(data[0]["embedding"]) == 384
                lat.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(texts) / (time.perf_counter() - t0), median(lat)


def bench_embed_singles(srv: LocalServer, texts: list[str], reps: int) -> tuple[list[float], float]:
    asyncio.run(_embed_singles(srv, texts[:CLIENTS * 2], CLIENTS))  # warm-up, opens the pool
    rates, lats = [], []
    for i in range(reps):
        rate, p50 = asyncio.run(_embed_singles(srv, texts, CLIENTS))
        rates.append(rate)
        lats.append(p50)
        console.log(f"fmserve embeddings 1 text/request x{CLIENTS} clients rep {i + 1}/{reps}: "
                    f"{rate:.0f} texts/s, p50 latency {p50:.1f} ms")
    return rates, median(lats)


# -- grammar-constrained generation ------------------------------------------------
def bench_grammar(srv: LocalServer, max_tokens: int, reps: int,
                  path: str) -> dict[str, list[Stream]]:
    bodies = {"free": chat_body(JSON_PROMPT, max_tokens, temperature=0.7),
              "json_schema": chat_body(JSON_PROMPT, max_tokens, temperature=0.7,
                                       response_format=RESPONSE_FORMAT)}
    out: dict[str, list[Stream]] = {k: [] for k in bodies}
    with srv.client(timeout=300) as client:
        for body in bodies.values():
            served_stream(client, body, path)  # warm-up
        for i in range(reps):  # interleaved, so drifting load hits both alike
            for kind, body in bodies.items():
                s = served_stream(client, body, path)
                out[kind].append(s)
                console.log(f"grammar {kind:11s} rep {i + 1}/{reps}: {s.tokens} tok, "
                            f"{s.decode_tps:.1f} tok/s, TTFT {s.ttft_ms:.0f} ms")
    return out


# -- report ------------------------------------------------------------------------
def f1(x: float) -> str:
    return "-" if x != x else f"{x:,.1f}"


def f0(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def times(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def pct(x: float) -> str:
    return "-" if x != x else f"{x * 100:.1f} %"


def verdict(value: float, target: float) -> str:
    if value != value:
        return "-"
    return "[green]ok[/]" if value >= target else "[red]MISS[/]"


def report(args: argparse.Namespace, fm: Results, ll: Results | None, e_direct: list[float],
           e_served: list[float], e_p50: float, gram: dict[str, list[Stream]],
           kernel: dict[int, float]) -> None:
    t = Table(title=f"fmserve batching benchmark ({'quick' if args.quick else 'full'}: "
                    f"{args.reps} reps, max_tokens={args.max_tokens}, threads={args.threads}; "
                    "medians)", box=box.MARKDOWN)
    for col, just in (("metric", "left"), ("baseline", "right"), ("fmserve", "right"),
                      ("fmserve / baseline", "right"), ("target", "left"), ("met", "left")):
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    nan = float("nan")
    llc = ll.concurrency if ll else {}
    for conc in LEVELS:
        m, b = fm.concurrency.get(conc, {}), llc.get(conc, {})
        agg, base = m.get("tps", nan), b.get("tps", nan)
        n = f"{conc} stream{'s' if conc > 1 else ''}"
        t.add_row(f"chat aggregate tok/s, {n} x {args.max_tokens} tok", f1(base), f1(agg),
                  times(div(agg, base)), "info", "")
        t.add_row(f"  TTFT p50 per stream (ms), {n}", f0(b.get("ttft_p50", nan)),
                  f0(m.get("ttft_p50", nan)), "", "info", "")
    one = fm.concurrency.get(1, {}).get("tps", nan)
    eight = fm.concurrency.get(8, {}).get("tps", nan)
    ll_ratio = div(llc.get(8, {}).get("tps", nan), llc.get(1, {}).get("tps", nan))
    t.add_row("chat aggregate, 8 streams / 1 stream (same server)", times(ll_ratio),
              times(div(eight, one)), "", ">= 2.5x", verdict(div(eight, one), 2.5))
    k1, k8 = kernel.get(1, nan), kernel.get(8, nan)
    t.add_row("  ceiling: bare llama_decode tok/s, 1 / 8 seqs per step", "",
              f"{f0(k1)} / {f0(k8)}", times(div(k8, k1)), "info", "")
    ed, es = median(e_direct), median(e_served)
    t.add_row(f"embeddings texts/s, {args.texts} texts, {CLIENTS} clients x 1 text/req",
              f0(ed), f0(es), pct(div(es, ed)), ">= 80 %", verdict(div(es, ed), 0.8))
    t.add_row("  p50 latency per embeddings request (ms)", "", f1(e_p50), "", "info", "")
    free = median([s.decode_tps for s in gram["free"]])
    js = median([s.decode_tps for s in gram["json_schema"]])
    t.add_row("json_schema decode tok/s, 1 stream, temp 0.7", f1(free), f1(js),
              pct(div(js, free)), ">= 70 %", verdict(div(js, free), 0.7))
    t.add_row("  tokens per answer / TTFT p50 (ms)",
              f"{f0(median([s.tokens for s in gram['free']]))} / "
              f"{f0(median([s.ttft_ms for s in gram['free']]))}",
              f"{f0(median([s.tokens for s in gram['json_schema']]))} / "
              f"{f0(median([s.ttft_ms for s in gram['json_schema']]))}", "", "info", "")
    console.print(t, width=max(console.width, 140), crop=False)
    console.print("baseline: llama_cpp.server (chat rows), one direct SentenceTransformer.encode("
                  "batch_size=64) with no server up (embeddings), the same request without "
                  "response_format (json_schema). aggregate = all tokens / wall time (prefill "
                  "included); TTFT = request sent -> first token; decode tok/s = "
                  "(tokens-1)/(t_last-t_first). Servers ran one after the other.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few reps, small N")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; quick 2); concurrency "
                    "rounds = reps // 2")
    ap.add_argument("--max-tokens", type=int, help="tokens per concurrent stream, N (default "
                    "64; quick 24); the grammar runs use 1.5 N")
    ap.add_argument("--texts", type=int, help="embedding texts (default 640; quick 128)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="chat streams' temperature (0 = greedy: fmserve then evaluates every "
                         "prompt in full, for reproducible answers)")
    ap.add_argument("--gguf", help="chat model file for every chat row (default: the bundled "
                    "SmolLM2 Q4_1 GGUF)")
    ap.add_argument("--weights", default=bundled_weights(),
                    help="what every chat row loads from that file (FMSERVE_LLAMA_WEIGHTS: gguf "
                         "= as is, auto, bf16, q8_0, f16, ...; default %(default)s, what the "
                         "bundled endpoint serves); other than the bundled default, fmserve "
                         "serves it as its own endpoint")
    ap.add_argument("--skip-llama-server", action="store_true",
                    help="no llama_cpp.server baseline (e.g. without the bench extra)")
    args = ap.parse_args()
    args.gguf = str(Path(args.gguf).resolve()) if args.gguf else str(bundled.smollm2_gguf())
    args.weights = check_weights(args.weights)
    model_file = weights.prepare(args.gguf, args.weights, threads=args.threads)
    args.reps = args.reps or (2 if args.quick else 5)
    args.max_tokens = args.max_tokens or (24 if args.quick else 64)
    args.texts = args.texts or (128 if args.quick else 640)
    rounds = max(1, args.reps // 2)

    info = Table(title="machine", show_header=False, box=box.MARKDOWN)
    for k, v in machine_info(args.threads):
        info.add_row(k, v)
    info.add_row("chat rows' model file", Path(args.gguf).name)
    info.add_row("chat rows' weights (loaded file)", f"{args.weights} ({Path(model_file).name})")
    console.print(info)
    texts = embed_texts(args.texts)
    if not args.skip_llama_server:  # fail now, not after the fmserve half
        subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], check=True)

    console.rule("direct embeddings (no server running)")
    e_direct = isolated(bench_direct_embed, args.threads, texts, args.reps)
    console.rule("bare llama_decode (no server running)")
    kernel = isolated(bench_decode_kernel, args.threads, 8 if args.quick else 32, model_file)

    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so a running server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-bench-"))
    fm, ll = Results(), None
    try:
        console.rule("fmserve")
        srv: LocalServer = start_server(tmp, args.threads)
        try:
            chat_path = chat_endpoint(srv, args.gguf, args.weights)
            bench_concurrency(fm, srv, args.max_tokens, rounds, levels=LEVELS,
                              temperature=args.temperature, path=chat_path)
            e_served, e_p50 = bench_embed_singles(srv, texts, args.reps)
            gram = bench_grammar(srv, args.max_tokens * 3 // 2, args.reps, chat_path)
        except BaseException:
            console.print(f"[red]server log:[/red]\n{srv.log()[-4000:]}")
            raise
        finally:
            stop_server(srv)
        if not args.skip_llama_server:
            console.rule("llama_cpp.server (one request at a time)")
            ll = Results()
            lsrv = start_llama_server(tmp, args.threads, model_file)
            try:
                bench_concurrency(ll, lsrv, args.max_tokens, rounds, levels=LEVELS,
                                  label="llama_cpp.server", temperature=args.temperature,
                                  path="/v1/chat/completions",
                                  on_line=_on_openai_line)
            except BaseException:
                console.print(f"[red]llama_cpp.server log:[/red]\n{lsrv.log()[-4000:]}")
                raise
            finally:
                stop_server(lsrv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report(args, fm, ll, e_direct, e_served, e_p50, gram, kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
