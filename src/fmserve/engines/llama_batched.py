"""Continuous batching for llama.cpp (runs inside a worker process).

:class:`BatchedLlamaEngine` owns the worker's loop (``run``): up to ``max_seqs``
requests are active at once, each a llama.cpp *sequence* in one shared KV cache.
Every step builds one ``llama_batch`` holding

* one token for each decoding sequence, and
* a chunk of the prompt of each sequence still in prefill: at most ``n_batch``
  tokens per step when no sequence is decoding, and at most ``prefill_chunk``
  (default 64) prompt tokens while some are, so a long prompt is spread over many
  steps and the decoding streams pause for one chunk at a time (64 tokens ≈ 0.3 s
  on 2 cores for the bundled model), not for its whole prefill,

calls ``llama_decode`` once, and samples each sequence from its own logits with its
own sampler (temperature, top-k/p, seed, grammar — ``engines/sampling.py``). New
requests join between steps; finished or cancelled ones leave. When the KV cache
is full, cached prefixes of finished requests are dropped first; if that is not
enough, the newest sequence fails with 503
``TEMPORARILY_UNAVAILABLE`` (and its cells are freed) rather than everything
stalling.

**Prefix caching.** A request that arrives while a running sequence is still
evaluating a prompt prefix it shares (``n`` > 1 choices of one prompt, many
requests with one system prompt) waits until that prefix is in the cache, then
copies it. A finished request leaves its KV cells in place, tagged with
its slot's sequence id; the ``prefix_cache_slots`` (default 2) most recently
finished ones are kept. Few, because every decode step attends over every used
cell of the unified cache, masked or not: eight stale 120-token prefixes cost the
bundled model ~10 % of its decode speed. A new request takes the free slot whose
cached tokens share the longest prefix with its prompt (or, when a running sequence shares a
longer one, copies that sequence's cells — ``llama_memory_seq_cp``, which in the
unified cache only tags the cells) and evaluates only the rest of the prompt.
Multi-turn chats, which re-send the whole history, thus prefill only the new
turn. ``cached_tokens`` on the ``start`` event says how many prompt tokens were
reused. Greedy (temperature 0) and seeded requests evaluate the whole prompt, as
in the one-at-a-time engine: logits computed in a different batch shape differ in
the last bits, enough to change a greedy answer from one request to the next. For
the same reason such a request, when it runs alone, first drops the cached
prefixes, so it sees the cache as a fresh worker would.

Prompt handling, stop sequences, UTF-8 and grammars are shared with
:class:`~fmserve.engines.llama_engine.LlamaEngine` (same events, same usage counts).
"""

from __future__ import annotations

import queue
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from fmserve.engines.grammar import COMPILE_TIMEOUT_S, TOO_SLOW, GrammarError
from fmserve.engines.llama_engine import LlamaEngine, schema_error
from fmserve.engines.sampling import build_sampler, reproducible
from fmserve.engines.textstream import TokenOutput

Emit = Callable[[dict[str, Any]], None]


@dataclass
class _Seq:
    rid: str
    seq_id: int
    prompt: list[int]
    sampler: Any
    out: TokenOutput  # stop sequences, max_tokens, tok/end events
    top_logprobs: int | None = None  # None: no logprobs; k: the sampled token + k best
    n_past: int = 0  # tokens already in the KV cache
    next_token: int | None = None  # sampled, not yet decoded
    logit_idx: int = -1  # row of this sequence's logits in the last batch
    step_tokens: int = 0  # tokens this sequence put in the current batch
    step_next: int | None = None  # next_token before the current batch (for rollback)
    kv: list[int] = field(default_factory=list)  # tokens in the KV cache, by position


# A request waits for a running prefill only when they share this many prompt tokens.
SHARE_MIN_TOKENS = 16


@dataclass
class _Prepared:
    """A request whose prompt is tokenized and grammar compiled, not yet placed."""

    msg: dict[str, Any]
    tokens: list[int]
    params: dict[str, Any]
    room: int  # context tokens left after the prompt
    grammar: Any  # an llguidance matcher, a Future of one (compiling), or None
    reproducible: bool  # greedy or seeded: no prefix reuse
    since: float  # time.monotonic() when it arrived

    @property
    def rid(self) -> str:
        return str(self.msg["id"])


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchedLlamaEngine(LlamaEngine):
    """A :class:`LlamaEngine` whose worker serves ``max_seqs`` requests at once."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__({**spec, "n_ctx": 256})  # the Llama object only tokenizes
        import llama_cpp
        from llama_cpp import _internals

        self.max_seqs = int(spec.get("max_seqs") or 8)
        self.n_batch = int(spec.get("n_batch") or 512)
        self.prefill_chunk = max(1, min(int(spec.get("prefill_chunk") or 64), self.n_batch))
        self.cache_slots = int(spec.get("prefix_cache_slots", 2))
        n_ctx = int(spec.get("n_ctx") or 0) or self.llm._model.n_ctx_train()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.max_seqs
        params.kv_unified = True  # every sequence may use the whole context
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        self.ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        self.n_ctx = n_ctx  # a single prompt may use the whole cache
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._cached: dict[int, list[int]] = {}  # free slot -> tokens its KV cells hold

    def _decode_ctx(self) -> Any:
        return self.ctx.ctx

    def info(self) -> dict[str, Any]:
        return {**super().info(), "n_ctx": self.n_ctx, "max_seqs": self.max_seqs,
                "continuous_batching": True}

    # -- the loop ----------------------------------------------------------------
    def run(self, inbox: queue.Queue[dict[str, Any] | None], cancelled: Any,
            emit: Emit) -> None:
        """Serve requests from ``inbox`` until it yields ``None``."""
        active: dict[int, _Seq] = {}
        free = list(range(self.max_seqs - 1, -1, -1))
        closing = False
        waiting: list[_Prepared] = []  # followers of a prefill in progress (see _follows)
        compiling: list[_Prepared] = []  # their grammar is being compiled in a thread
        while True:
            for req in list(compiling):
                if cancelled.pop(req.rid):
                    compiling.remove(req)
                elif req.grammar.done() or time.monotonic() - req.since > COMPILE_TIMEOUT_S:
                    compiling.remove(req)
                    try:
                        req.grammar = req.grammar.result(timeout=0)
                        waiting.append(req)
                    except (GrammarError, FutureTimeout) as exc:
                        emit(schema_error(req.rid, exc if isinstance(exc, GrammarError)
                                          else GrammarError(TOO_SLOW)))
            for req in list(waiting):
                if cancelled.pop(req.rid):
                    waiting.remove(req)
                elif free and not self._follows(req, active.values()):
                    waiting.remove(req)
                    self._place(req, free, active, emit)
            while free and not closing:  # admit new requests between steps
                try:
                    idle = not active and not waiting
                    msg = inbox.get(block=idle, timeout=0.002 if idle and compiling else None)
                except queue.Empty:
                    break
                if msg is None:  # finish what runs, then stop
                    closing = True
                    break
                if cancelled.pop(msg["id"]):
                    continue
                new = self._prepare(msg, emit)
                if new is None:
                    continue
                if isinstance(new.grammar, Future):
                    compiling.append(new)
                elif self._follows(new, active.values()):
                    waiting.append(new)
                else:
                    self._place(new, free, active, emit)
            for seq in list(active.values()):
                if seq.rid in cancelled:
                    cancelled.pop(seq.rid)
                    seq.out.finish("cancelled")
                    self._release(seq)
                    del active[seq.seq_id]
                    free.append(seq.seq_id)
            if not active:
                if closing and not waiting and not compiling:
                    return
                if compiling and not waiting:  # nothing to decode: wait for a grammar
                    wait([r.grammar for r in compiling], timeout=0.05, return_when=FIRST_COMPLETED)
                continue
            try:
                finished = self._step(list(active.values()), emit)
            except Exception as exc:  # fail this step's requests, keep the worker serving
                traceback.print_exc()
                finished = list(active.values())
                for seq in finished:
                    emit({"t": "err", "id": seq.rid, "code": "INTERNAL_ERROR",
                          "message": f"{type(exc).__name__}: {exc}"})
                    self._release(seq, keep=False)
            for seq in finished:
                del active[seq.seq_id]
                free.append(seq.seq_id)

    def _prepare(self, msg: dict[str, Any], emit: Emit) -> _Prepared | None:
        rid = msg["id"]
        if msg.get("op") != "generate":
            emit({"t": "err", "id": rid, "code": "INTERNAL_ERROR",
                  "message": f"llama_cpp worker cannot do {msg.get('op')!r}"})
            return None
        prepared = self.prepare(msg, emit, compile_grammar=False)
        if prepared is None:
            return None
        tokens, params, room, grammar = prepared
        return _Prepared(msg, tokens, params, room, grammar, reproducible(params),
                         time.monotonic())

    @staticmethod
    def _follows(req: _Prepared, active: Any) -> bool:
        """True when ``req`` should wait for a running sequence still evaluating a prompt
        prefix it shares (``n`` > 1 choices, one system prompt for many requests): once
        that prefix is in the cache, ``req`` copies it instead of evaluating it again."""
        if req.reproducible:
            return False
        for seq in active:
            if seq.n_past < len(seq.prompt):
                shared = common_prefix(seq.prompt, req.tokens)
                if shared >= SHARE_MIN_TOKENS and len(seq.kv) < min(shared,
                                                                   len(req.tokens) - 1):
                    return True
        return False

    def _place(self, req: _Prepared, free: list[int], active: dict[int, _Seq],
               emit: Emit) -> None:
        seq = self._admit(req, free, list(active.values()), emit)
        free.remove(seq.seq_id)
        active[seq.seq_id] = seq

    def _admit(self, req: _Prepared, free: list[int], active: list[_Seq], emit: Emit) -> _Seq:
        rid, tokens, params, room = req.rid, req.tokens, req.params, req.room
        reproducible = req.reproducible
        if reproducible and not active and self._cached:
            # Alone, a greedy/seeded request must meet the cache as a fresh worker
            # would: cached cells elsewhere change the attention's shape (more cells,
            # masked), and that alone can flip a greedy choice.
            self._drop_cached()
        seq_id, reused = self._slot(tokens, free, active, reuse=not reproducible)
        emit({"t": "start", "id": rid, "prompt_tokens": len(tokens), "cached_tokens": reused,
              "thinking": req.msg.get("_thinking", False)})
        max_tokens = min(int(params.get("max_tokens") or room), room)
        top = params.get("logprobs")
        constraint = (None if req.grammar is None
                      else self.grammars.constraint(req.grammar, max_tokens))
        sampler = build_sampler(self.llm.n_vocab(), params, constraint)
        return _Seq(rid=rid, seq_id=seq_id, prompt=tokens, sampler=sampler,
                    out=self.output(rid, len(tokens), params, max_tokens, emit),
                    top_logprobs=None if top is None else int(top), n_past=reused,
                    kv=tokens[:reused])

    def _slot(self, prompt: list[int], free: list[int], active: list[_Seq],
              reuse: bool) -> tuple[int, int]:
        """Picks a free slot for ``prompt``; returns (seq id, prompt tokens already cached).

        The longest cached prefix wins: a free slot's own leftover cells, or a running
        sequence's cells (copied). At least the prompt's last token is always
        evaluated (its logits are needed).
        """
        limit = len(prompt) - 1
        best, best_len = None, 0
        src, src_len = None, 0
        if reuse:
            for slot in free:
                n = min(common_prefix(self._cached.get(slot, []), prompt), limit)
                if n > best_len:
                    best, best_len = slot, n
            for seq in active:  # a running sequence with the same prefix
                n = min(common_prefix(seq.kv, prompt), limit)
                if n > src_len:
                    src, src_len = seq, n
        if best is not None and best_len >= src_len:  # this slot's own cells; drop the rest
            self._lib.llama_memory_seq_rm(self._memory, best, best_len, -1)
            del self._cached[best]
            return best, best_len
        # An empty slot if any, else the one caching least; its old cells go.
        slot = min(free, key=lambda s: len(self._cached.get(s, [])))
        if self._cached.pop(slot, None) is not None:
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        if src is None:
            return slot, 0
        self._lib.llama_memory_seq_cp(self._memory, src.seq_id, slot, 0, src_len)
        return slot, src_len

    # -- one decode step ------------------------------------------------------------
    def _step(self, seqs: list[_Seq], emit: Emit) -> list[_Seq]:
        """Decode one batch; returns the sequences that finished."""
        import llama_cpp

        b = self.batch
        n = 0
        sampling: list[_Seq] = []
        decoding = sum(1 for s in seqs if s.next_token is not None)
        budget = self.n_batch if not decoding else min(self.n_batch,
                                                       decoding + self.prefill_chunk)
        # Decoding sequences first (one token each), then prompt chunks in the rest.
        for seq in sorted(seqs, key=lambda s: s.next_token is None):
            if n >= budget:
                break
            if seq.next_token is not None:
                toks = [seq.next_token]
            else:
                toks = seq.prompt[seq.n_past:seq.n_past + budget - n]
            seq.kv.extend(toks)
            for i, tok in enumerate(toks):
                b.token[n] = tok
                b.pos[n] = seq.n_past + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.seq_id
                b.logits[n] = 0
                n += 1
            seq.step_tokens, seq.step_next = len(toks), seq.next_token
            seq.n_past += len(toks)
            seq.next_token = None
            if seq.n_past >= len(seq.prompt):  # prompt done: sample from the last row
                b.logits[n - 1] = 1
                seq.logit_idx = n - 1
                sampling.append(seq)
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            in_batch = [s for s in seqs if s.step_tokens]
            for seq in in_batch:  # nothing of this batch was kept: roll the step back
                seq.n_past -= seq.step_tokens
                del seq.kv[len(seq.kv) - seq.step_tokens:]
                seq.next_token = seq.step_next
            return self._kv_full(in_batch, rc, emit)
        for seq in seqs:
            seq.step_tokens = 0
        done = []
        for seq in sampling:
            try:
                tok = seq.sampler.sample(self.ctx, seq.logit_idx)
            except GrammarError as exc:  # this sequence's grammar failed: end it alone
                emit({"t": "err", "id": seq.rid, "code": "INTERNAL_ERROR",
                      "message": f"Grammar-constrained decoding failed: {exc}"})
                self._release(seq, keep=False)
                done.append(seq)
                continue
            lp = (None if seq.top_logprobs is None
                  else self.logprobs.entry(seq.logit_idx, tok, seq.top_logprobs))
            if self._accept(seq, tok, lp):
                done.append(seq)
            else:
                seq.next_token = tok
        return done

    def _accept(self, seq: _Seq, tok: int, lp: dict[str, Any] | None = None) -> bool:
        """Handles one sampled token; True when the sequence finished (and was released)."""
        finished = seq.out.accept(tok, lp)
        if not finished and seq.n_past + 1 >= self.n_ctx:  # the shared context ran out
            seq.out.finish("length")
            finished = True
        if finished:
            self._release(seq)
        return finished

    def _drop_cached(self) -> None:
        for slot in self._cached:
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._cached.clear()

    def _release(self, seq: _Seq, keep: bool = True) -> None:
        """Ends a sequence; its KV cells stay as a cached prefix unless ``keep`` is False."""
        if keep and seq.kv and self.cache_slots > 0:
            self._cached[seq.seq_id] = seq.kv
            while len(self._cached) > self.cache_slots:  # the oldest cache goes
                old = next(iter(self._cached))
                self._lib.llama_memory_seq_rm(self._memory, old, -1, -1)
                del self._cached[old]
        else:
            self._lib.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        seq.sampler.close()

    def _kv_full(self, seqs: list[_Seq], rc: int, emit: Emit) -> list[_Seq]:
        """The cache had no room for this batch: drop cached prefixes and retry; when
        there are none, fail the newest sequence and retry the rest."""
        for seq in seqs:
            seq.step_tokens = 0
        if self._cached:
            self._drop_cached()
            return []
        victim = max(seqs, key=lambda s: int(s.rid) if s.rid.isdigit() else 0)
        emit({"t": "err", "id": victim.rid, "code": "TEMPORARILY_UNAVAILABLE",
              "message": f"The model's KV cache ({self.n_ctx} tokens shared by all running "
                         f"requests) is full (llama_decode returned {rc}). Retry shortly or "
                         "send shorter prompts.", "retry_after": 1})
        self._release(victim, keep=False)
        return [victim]
