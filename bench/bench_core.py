"""fmserve core benchmark: the bundled models direct vs. through a real fmserve server.

Run by hand (not a test)::

    .venv/bin/python bench/bench_core.py            # full run, a few minutes
    .venv/bin/python bench/bench_core.py --quick    # smoke run, well under a minute

What it measures, in one run, on the same model files and the same thread count
(``--threads``, default 2 = this machine's cores):

1. **Chat decode, single stream** - SmolLM2-135M-Instruct, the weights file the
   bundled endpoint loads (a BF16 or Q8_0 copy of the shipped Q4_1 GGUF,
   :func:`bundled_chat_file`).

   *direct*: ``llama_cpp.Llama(model_path, n_ctx=8192, n_threads=T)`` in this
   process; the prompt is rendered exactly as fmserve's llama engine renders it
   (the GGUF's ``tokenizer.chat_template`` through ``Jinja2ChatFormatter``, same
   BOS rule) and generated with ``Llama.generate`` at temperature 0 (greedy), each
   token detokenized as it arrives - the same path ``engines/llama_engine.py``
   runs, minus fmserve. ``create_chat_completion(stream=True)`` is timed too, for
   reference (llama-cpp-python's own OpenAI-style path).

   *fmserve*: ``fmserve serve`` started as a subprocess (as ``tests/conftest.py``
   does, fresh ``FMSERVE_HOME``, ``FMSERVE_LLAMA_THREADS=T``); the same chat
   request (``stream: true, temperature: 0, max_tokens: N``) is POSTed with httpx
   to ``/serving-endpoints/databricks-smollm2-135m-instruct/invocations`` and the
   SSE stream read; tokens are counted from the chunks' cumulative
   ``usage.completion_tokens``.

   Metrics (median over ``--reps`` runs, after one warm-up run):
     * decode tokens/s = (tokens - 1) / (time of last token - time of first token)
     * TTFT, ms = time from sending the request (direct: rendering the prompt) to the
       first generated token: prompt evaluation plus, for fmserve, its per-request
       overhead (HTTP, auth, validation, worker IPC, SSE) - the difference.
   fmserve's engine resets the KV cache for temperature-0 / seeded requests (so
   greedy output does not depend on the previous request), i.e. it evaluates the
   whole prompt every time; the direct baseline does the same (``llm.reset()``).
   The direct TTFT *with* a prefix-cache hit is printed for reference.
   Targets: fmserve/direct decode ratio >= 90 %, TTFT overhead < 5 ms.

2. **Chat, concurrent streams through fmserve** - 1, 4 and 8 concurrent streams
   (asyncio + ``httpx.AsyncClient``, distinct prompts, ``max_tokens`` = N/2):
   aggregate tokens/s = all tokens / wall time, and p50 TTFT over the streams.
   The llama worker decodes up to ``FMSERVE_LLAMA_MAX_SEQS`` (8) streams together
   (continuous batching); the aggregate includes each stream's prefill. The
   direct column repeats the direct single-stream decode rate for comparison.

3. **Embeddings** - all-MiniLM-L6-v2 (sentence-transformers, torch threads = T),
   384 distinct texts.
     * direct: one ``SentenceTransformer(folder, device="cpu").encode(texts,
       batch_size=64)`` call; texts/s.
     * fmserve, batched: ``POST /serving-endpoints/databricks-all-minilm-l6-v2/
       invocations`` with ``{"input": [64 texts]}``, 6 requests in sequence; texts/s.
     * fmserve, one text per request, 8 concurrent clients; texts/s (compared
       with the direct batched rate, so expect it far lower - this shows the
       per-request cost, not a regression).

The direct measurements run before the server starts, and their models are
deleted (and garbage-collected) first, so direct and server never compete for the
cores. Everything else on the machine does compete: on a shared box the numbers
are noisy - compare ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import orjson  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fmserve.engines import bundled, weights  # noqa: E402
from fmserve.serving.catalog import SYSTEM_MODELS, llama_weights  # noqa: E402
from fmserve.testing import LocalServer, stop_server  # noqa: E402
from fmserve.testing import start_server as _start_server  # noqa: E402

CHAT = "databricks-smollm2-135m-instruct"
EMBED = "databricks-all-minilm-l6-v2"
N_CTX = 8192
# Long-form prompt: greedy SmolLM2 writes well past 256 tokens without stopping.
PROMPT = ("Write a very long, detailed story about a dragon who learns to cook. "
          "Use at least 1000 words.")
TOPICS = ["a lighthouse keeper", "a robot gardener", "a lost cat in Paris", "a time-travelling "
          "baker", "a pirate who fears water", "a musician on Mars", "an old oak tree",
          "a detective penguin", "a girl who talks to clouds", "a clockmaker's apprentice",
          "a library that moves", "a shy volcano", "two rival chefs", "a desert caravan",
          "a snowman in summer", "the last train home"]

console = Console(width=None if sys.stdout.isatty() else 130)


# -- helpers -----------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info(threads: int) -> list[tuple[str, str]]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 0
    try:
        mem_kb = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                          if ln.startswith("MemTotal")))
        mem = f"{mem_kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    # Versions from metadata: importing torch here would slow llama.cpp in this
    # process (two OpenMP runtimes), which is why the direct runs use subprocesses.
    from importlib.metadata import version
    return [
        ("CPU", cpu),
        ("cores", f"{os.cpu_count()} logical, {avail} usable by this process"),
        ("memory", mem),
        ("load avg (1/5/15 min)", load),
        ("threads used (llama.cpp / torch)", str(threads)),
        ("python", platform.python_version()),
        ("llama-cpp-python / torch / sentence-transformers",
         f"{version('llama-cpp-python')} / {version('torch')} / "
         f"{version('sentence-transformers')}"),
        ("chat model (loaded file)", Path(bundled_chat_file()).name),
        ("embeddings model", "all-MiniLM-L6-v2"),
    ]


def embed_texts(n: int) -> list[str]:
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew "
             "potions for the kingdom of distant mountains near rivers and silver lakes").split()
    out = []
    for i in range(n):
        k = 6 + (i * 7) % 19  # 6..24 words, deterministic
        out.append(f"Sentence {i}: " + " ".join(words[(i + j * 3) % len(words)] for j in range(k)))
    return out


@dataclass
class Stream:
    """Timing of one generated stream."""

    t_start: float
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0

    @property
    def ttft_ms(self) -> float:
        return ((self.t_first or float("nan")) - self.t_start) * 1000

    @property
    def decode_tps(self) -> float:
        if self.tokens < 2 or self.t_first is None or self.t_last is None:
            return float("nan")
        dt = self.t_last - self.t_first
        return (self.tokens - 1) / dt if dt > 0 else float("nan")


@dataclass
class Results:
    info: list[tuple[str, str]] = field(default_factory=list)
    direct_gen: list[Stream] = field(default_factory=list)
    direct_ccc: list[Stream] = field(default_factory=list)
    direct_hit: list[Stream] = field(default_factory=list)
    served: list[Stream] = field(default_factory=list)
    concurrency: dict[int, dict[str, float]] = field(default_factory=dict)
    emb_direct: list[float] = field(default_factory=list)  # texts/s
    emb_batched: list[float] = field(default_factory=list)
    emb_single: list[float] = field(default_factory=list)
    emb_single_p50_ms: list[float] = field(default_factory=list)


# -- direct llama.cpp ------------------------------------------------------------
def bundled_weights() -> str:
    """What the bundled chat endpoint loads (``FMSERVE_LLAMA_WEIGHTS``): as the server
    decides it, from this environment (the servers here inherit it) or the model's own."""
    return llama_weights(None, os.environ.get(weights.ENV_VAR, ""),
                         SYSTEM_MODELS["smollm2-135m-instruct"]())


def bundled_chat_file() -> str:
    """The GGUF the bundled chat endpoint loads (made and cached on first use)."""
    return weights.prepare(str(bundled.smollm2_gguf()), bundled_weights())


def bench_direct_llm(threads: int, max_tokens: int, reps: int
                     ) -> tuple[list[Stream], list[Stream], list[Stream]]:
    """Runs in a fresh process (see :func:`isolated`)."""
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=bundled_chat_file(), n_ctx=N_CTX, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    meta = llm.metadata

    def piece(tok: int) -> str:
        return llm._model.token_get_text(tok) if tok >= 0 else ""

    # Rendered exactly as fmserve.engines.llama_engine does.
    fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=piece(llm.token_eos()),
                              bos_token=piece(llm.token_bos()))
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
    messages = [{"role": "user", "content": PROMPT}]
    vocab = llm._model.vocab

    def run_generate(cached: bool = False) -> Stream:
        s = Stream(time.perf_counter())
        tokens = llm.tokenize(fmt(messages=messages).prompt.encode("utf-8"), add_bos=add_bos,
                              special=True)
        if not cached:
            # As fmserve's engine does for temperature 0 / a seed (reproducible output):
            # evaluate the whole prompt, no KV-cache prefix reuse.
            llm.reset()
        for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=1.0, min_p=0.0,
                                repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            llm.detokenize([tok])
            now = time.perf_counter()
            s.tokens += 1
            if s.t_first is None:
                s.t_first = now
            s.t_last = now
            if s.tokens >= max_tokens:
                break
        return s

    def run_ccc() -> Stream:
        s = Stream(time.perf_counter())
        for chunk in llm.create_chat_completion(messages=messages, stream=True, temperature=0,
                                                max_tokens=max_tokens):
            if chunk["choices"][0]["delta"].get("content"):  # ~one chunk per token
                now = time.perf_counter()
                s.tokens += 1
                if s.t_first is None:
                    s.t_first = now
                s.t_last = now
        return s

    gen: list[Stream] = []
    ccc: list[Stream] = []
    run_generate()  # warm-up (also fills the prefix cache, as on the server)
    for i in range(reps):
        gen.append(run_generate())
        console.log(f"direct generate  rep {i + 1}/{reps}: {gen[-1].tokens} tok, "
                    f"{gen[-1].decode_tps:.1f} tok/s, TTFT {gen[-1].ttft_ms:.1f} ms")
    run_generate(cached=True)
    hit = [run_generate(cached=True) for _ in range(max(1, reps // 2))]
    console.log(f"direct generate, KV prefix-cache hit: TTFT {median([s.ttft_ms for s in hit]):.1f}"
                " ms")
    run_ccc()
    for _ in range(max(1, reps // 2)):
        ccc.append(run_ccc())
    console.log(f"direct create_chat_completion: {median([s.decode_tps for s in ccc]):.1f} tok/s,"
                f" TTFT {median([s.ttft_ms for s in ccc]):.1f} ms")
    llm.close()
    gc.collect()
    return gen, ccc, hit


# -- direct sentence-transformers --------------------------------------------------
def bench_direct_embed(threads: int, texts: list[str], reps: int) -> list[float]:
    """Runs in a fresh process (see :func:`isolated`); texts/s per rep."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(bundled.minilm_folder()), device="cpu")
    rates: list[float] = []
    with torch.inference_mode():
        model.encode(texts[:64], batch_size=64, show_progress_bar=False)  # warm-up
        for i in range(reps):
            t0 = time.perf_counter()
            vecs = model.encode(texts, batch_size=64, show_progress_bar=False)
            dt = time.perf_counter() - t0
            assert vecs.shape == (len(texts), 384), vecs.shape
            rates.append(len(texts) / dt)
            console.log(f"direct embeddings rep {i + 1}/{reps}: {rates[-1]:.0f} texts/s")
    del model
    gc.collect()
    return rates


def isolated(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh interpreter that exits afterwards.

    llama.cpp and torch each bring an OpenMP runtime; in one process the second
    one loaded runs several times slower (measured: 107 -> 9 tok/s for llama.cpp
    after ``import torch``). fmserve keeps them in separate worker processes, so
    the direct baselines do the same - and the process exiting guarantees the
    model is gone before the server starts.
    """
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        return pool.apply(fn, args)
    finally:
        pool.close()  # let the child exit normally (terminate() leaks its semaphores)
        pool.join()


# -- the server --------------------------------------------------------------------
Server = LocalServer


def start_server(tmp: Path, threads: int, timeout_s: float = 300) -> Server:
    env = {"FMSERVE_LLAMA_THREADS": str(threads), "FMSERVE_EMBED_THREADS": str(threads),
           "FMSERVE_N_CTX": str(N_CTX)}
    return _start_server(tmp, env_extra=env, timeout_s=timeout_s,
                         serve_args=("--log-level", "warning"))


def chat_body(prompt: str, max_tokens: int, temperature: float = 0,
              **extra: Any) -> dict[str, Any]:
    """A streaming chat request; ``extra`` adds fields (e.g. ``response_format``)."""
    return {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "temperature": temperature, "max_tokens": max_tokens, **extra}


def _on_sse_line(s: Stream, line: str) -> None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    chunk = orjson.loads(line[6:])
    if "error_code" in chunk:
        raise RuntimeError(f"error in stream: {chunk}")
    n = (chunk.get("usage") or {}).get("completion_tokens") or 0
    if n > s.tokens:
        now = time.perf_counter()
        s.tokens = n
        if s.t_first is None:
            s.t_first = now
        s.t_last = now


def served_stream(client: httpx.Client, body: dict[str, Any],
                  path: str = f"/serving-endpoints/{CHAT}/invocations") -> Stream:
    s = Stream(time.perf_counter())
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            _on_sse_line(s, line)
    return s


OnLine = Callable[[Stream, str], None]


async def served_stream_async(client: httpx.AsyncClient, body: dict[str, Any],
                              path: str = f"/serving-endpoints/{CHAT}/invocations",
                              on_line: OnLine = _on_sse_line) -> Stream:
    """One SSE stream; ``path``/``on_line`` let another server (and chunk format) be timed."""
    s = Stream(time.perf_counter())
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        async for line in r.aiter_lines():
            on_line(s, line)
    return s


def bench_served_llm(res: Results, srv: Server, max_tokens: int, reps: int) -> None:
    with srv.client(timeout=300) as client:
        served_stream(client, chat_body(PROMPT, max_tokens))  # warm-up (+ keep-alive conn)
        for i in range(reps):
            res.served.append(served_stream(client, chat_body(PROMPT, max_tokens)))
            s = res.served[-1]
            console.log(f"fmserve stream   rep {i + 1}/{reps}: {s.tokens} tok, "
                        f"{s.decode_tps:.1f} tok/s, TTFT {s.ttft_ms:.1f} ms")


async def _concurrent_round(srv: Server, conc: int, max_tokens: int, round_no: int,
                            temperature: float = 0.0,
                            **stream_kw: Any) -> tuple[float, list[float], int]:
    async with srv.async_client(timeout=600, connections=conc + 2) as client:
        bodies = [chat_body(f"Write a long story about "
                            f"{TOPICS[(round_no * conc + i) % len(TOPICS)]} (#{round_no}.{i}).",
                            max_tokens, temperature) for i in range(conc)]
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(served_stream_async(client, b, **stream_kw)
                                         for b in bodies))
        wall = time.perf_counter() - t0
    total = sum(s.tokens for s in streams)
    return total / wall, [s.ttft_ms for s in streams], total


def bench_concurrency(res: Results, srv: Server, max_tokens: int, rounds: int,
                      levels: tuple[int, ...] = (1, 4, 8), label: str = "fmserve",
                      temperature: float = 0.0, **stream_kw: Any) -> None:
    """Fills ``res.concurrency``; ``stream_kw`` goes to :func:`served_stream_async`."""
    asyncio.run(_concurrent_round(srv, 2, 8, 99, **stream_kw))  # warm-up
    for conc in levels:
        tps, ttfts, toks = [], [], 0
        for r in range(rounds):
            agg, tt, total = asyncio.run(_concurrent_round(srv, conc, max_tokens, r,
                                                           temperature, **stream_kw))
            tps.append(agg)
            ttfts.extend(tt)
            toks += total
        res.concurrency[conc] = {"tps": median(tps), "ttft_p50": median(ttfts),
                                 "ttft_max": max(ttfts), "tokens": toks / rounds}
        console.log(f"{label} {conc} concurrent: {median(tps):.1f} tok/s aggregate, "
                    f"p50 TTFT {median(ttfts):.0f} ms, {toks / rounds:.0f} tok per round")


def bench_served_embed(res: Results, srv: Server, texts: list[str], reps: int,
                       single_clients: int) -> None:
    url = f"/serving-endpoints/{EMBED}/invocations"

    def check(r: httpx.Response, n: int) -> None:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        data = orjson.loads(r.content)["data"]
        assert len(data) == n and len(data[0]["embedding"]) == 384

    with srv.client(timeout=300) as client:
        check(client.post(url, json={"input": texts[:64]}), 64)  # warm-up
        for i in range(reps):
            t0 = time.perf_counter()
            for k in range(0, len(texts), 64):
                batch = texts[k:k + 64]
                check(client.post(url, json={"input": batch}), len(batch))
            res.emb_batched.append(len(texts) / (time.perf_counter() - t0))
            console.log(f"fmserve embeddings batched rep {i + 1}/{reps}: "
                        f"{res.emb_batched[-1]:.0f} texts/s")

    async def singles() -> tuple[float, float]:
        lat: list[float] = []
        async with srv.async_client(timeout=300, connections=single_clients + 2) as client:
            todo = iter(texts)

            async def worker() -> None:
                for text in todo:  # shared iterator: each text is sent once
                    t = time.perf_counter()
                    check(await client.post(url, json={"input": [text]}), 1)
                    lat.append((time.perf_counter() - t) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(single_clients)))
            return len(texts) / (time.perf_counter() - t0), median(lat)

    asyncio.run(singles())  # warm-up
    for i in range(max(1, reps // 2)):
        rate, p50 = asyncio.run(singles())
        res.emb_single.append(rate)
        res.emb_single_p50_ms.append(p50)
        console.log(f"fmserve embeddings 1/request x{single_clients} clients rep {i + 1}: "
                    f"{rate:.0f} texts/s, p50 latency {p50:.1f} ms")


# -- report ------------------------------------------------------------------------
def report(res: Results, args: argparse.Namespace) -> None:
    def f1(x: float) -> str:
        return "-" if x != x else f"{x:,.1f}"

    def f0(x: float) -> str:
        return "-" if x != x else f"{x:,.0f}"

    def ratio(a: float, b: float, target: float) -> str:
        r = a / b if b else float("nan")
        ok = r >= target
        return f"[{'green' if ok else 'red'}]{r * 100:.1f} %[/]"

    d_tps = median([s.decode_tps for s in res.direct_gen])
    d_ttft = median([s.ttft_ms for s in res.direct_gen])
    c_tps = median([s.decode_tps for s in res.direct_ccc])
    c_ttft = median([s.ttft_ms for s in res.direct_ccc])
    s_tps = median([s.decode_tps for s in res.served])
    s_ttft = median([s.ttft_ms for s in res.served])
    d_tok = median([s.tokens for s in res.direct_gen])
    s_tok = median([s.tokens for s in res.served])

    t = Table(title=f"fmserve core benchmark ({'quick' if args.quick else 'full'}: "
                    f"{args.reps} reps, max_tokens={args.max_tokens}, threads={args.threads}; "
                    "medians)")
    t.add_column("metric")
    t.add_column("direct", justify="right")
    t.add_column("fmserve", justify="right")
    t.add_column("ratio / overhead", justify="right")
    t.add_column("target")
    t.add_row("chat tokens generated per stream", f0(d_tok), f0(s_tok),
              "" if d_tok == s_tok else "[yellow]differs[/]", f"= {args.max_tokens}")
    t.add_row("chat decode, 1 stream (tok/s)", f1(d_tps), f1(s_tps), ratio(s_tps, d_tps, 0.9),
              ">= 90 %")
    over = s_ttft - d_ttft
    t.add_row("chat TTFT, 1 stream (ms)", f1(d_ttft), f1(s_ttft),
              f"[{'green' if over < 5 else 'red'}]{over:+.1f} ms[/]", "< +5 ms")
    t.add_row("  ref: direct TTFT with KV prefix-cache hit (ms)",
              f1(median([s.ttft_ms for s in res.direct_hit])), "", "", "info (fmserve resets "
              "at temp 0)")
    t.add_row("  ref: llama-cpp create_chat_completion (tok/s | TTFT ms)",
              f"{f1(c_tps)} | {f1(c_ttft)}", "", "", "info")
    for conc, m in sorted(res.concurrency.items()):
        t.add_row(f"chat aggregate, {conc} concurrent x {args.max_tokens // 2} tok (tok/s)",
                  f1(d_tps), f1(m["tps"]), ratio(m["tps"], d_tps, 0.9),
                  "info (issue target: 8 streams >= 2.5x 1 stream)")
        t.add_row(f"  p50 / max TTFT per stream, {conc} concurrent (ms)", "",
                  f"{f0(m['ttft_p50'])} / {f0(m['ttft_max'])}", "", "info (queueing)")
    e_d = median(res.emb_direct)
    e_b = median(res.emb_batched)
    e_s = median(res.emb_single)
    t.add_row(f"embeddings, {args.texts} texts, batches of 64 (texts/s)", f0(e_d), f0(e_b),
              ratio(e_b, e_d, 0.9), ">= 90 %")
    t.add_row(f"embeddings, 1 text/request, {args.clients} clients (texts/s)", f0(e_d), f0(e_s),
              f"{(e_s / e_d * 100 if e_d else float('nan')):.1f} %", "info")
    t.add_row("  p50 latency, 1 text/request (ms)", "", f1(median(res.emb_single_p50_ms)), "",
              "info")
    console.print(t)
    console.print("[dim]decode tok/s = (tokens-1)/(t_last-t_first); TTFT = request sent -> "
                  "first token; direct runs happen with no server up. Other load on the "
                  "machine (see load avg above) makes absolute numbers noisy.[/dim]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few reps, small N")
    ap.add_argument("--reps", type=int, help="repetitions per measurement (default 5; quick 2)")
    ap.add_argument("--max-tokens", type=int, help="tokens per single stream (default 128; "
                    "quick 32); concurrent streams get half")
    ap.add_argument("--texts", type=int, help="embedding texts (default 384; quick 128)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent 1-text embedding clients")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    ap.add_argument("--keep-dir", action="store_true", help="keep the server's temp data dir")
    args = ap.parse_args()
    args.reps = args.reps or (2 if args.quick else 5)
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    args.texts = args.texts or (128 if args.quick else 384)
    args.texts = max(64, args.texts // 64 * 64)

    res = Results(info=machine_info(args.threads))
    info = Table(title="machine", show_header=False)
    for k, v in res.info:
        info.add_row(k, v)
    console.print(info)
    texts = embed_texts(args.texts)

    console.rule("direct (no server running)")
    res.direct_gen, res.direct_ccc, res.direct_hit = isolated(
        bench_direct_llm, args.threads, args.max_tokens, args.reps)
    res.emb_direct = isolated(bench_direct_embed, args.threads, texts, args.reps)

    console.rule("through fmserve")
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the server below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="fmserve-bench-"))
    t0 = time.perf_counter()
    srv = start_server(tmp, args.threads)
    console.log(f"server up at {srv.url} in {time.perf_counter() - t0:.1f} s (data dir {tmp})")
    try:
        bench_served_llm(res, srv, args.max_tokens, args.reps)
        bench_concurrency(res, srv, args.max_tokens // 2, 1 if args.quick else 2)
        bench_served_embed(res, srv, texts, args.reps, args.clients)
    except BaseException:
        console.print(f"[red]server log ({srv.log_path}):[/red]\n"
                      f"{srv.log_path.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        stop_server(srv)
        if not args.keep_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    report(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
