"""Grammar-constrained decoding with llguidance (runs inside a llama.cpp worker).

llguidance (https://github.com/guidance-ai/llguidance, the engine behind llama.cpp's
``--llguidance`` and Guidance) turns a JSON Schema or a Lark grammar into a
token-level matcher over the model's own vocabulary: it says which tokens may come
next (a bitmask, one bit per token) and consumes the chosen one. It is written in
Rust: a schema it cannot handle is an error value, never a crash, and grammar
construction and mask computation run under fuel limits (:data:`LIMITS_KW`), so no
schema can hang or kill the worker. Construction drops the GIL; it runs in a thread
with a time bound (:data:`COMPILE_TIMEOUT_S`). The grammar text comes from
:mod:`fmserve.engines.schema_grammar`.

:class:`GrammarCompiler` caches one compiled matcher per spec (by canonical digest)
and hands out deep copies; :class:`ConstrainedSampler` (the batched engine) and
:class:`Mask` (any logits array) apply one to sampling, with budget steering
(:mod:`fmserve.engines.steering`) near ``max_tokens``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmserve.engines.schema_grammar import GrammarError, Relax, grammar_text, relaxed
from fmserve.engines.steering import BudgetSteer, ClosingTokens
from fmserve.protocol.schemas import digest_of

__all__ = ["COMPILE_TIMEOUT_S", "ConstrainedSampler", "Constraint", "GrammarCompiler",
           "GrammarError", "Mask", "TOO_SLOW"]

log = logging.getLogger("fmserve.grammar")

COMPILE_TIMEOUT_S = 5.0
CACHE_SIZE = 128
# llguidance's resource bounds (its defaults, with a smaller grammar ceiling).
LIMITS_KW: dict[str, Any] = {
    "max_grammar_size": 200_000, "initial_lexer_fuel": 1_000_000, "step_lexer_fuel": 200_000,
    "step_max_items": 50_000, "max_lexer_states": 250_000, "verbose_errors": False}


TOO_SLOW = (f"the schema took longer than {COMPILE_TIMEOUT_S:g} s to compile; simplify it")



class GrammarCompiler:
    """Compiles grammar specs for one model's vocabulary; caches them by digest.

    Args:
        vocab: the model's ``llama_vocab`` pointer.
        n_vocab: vocabulary size (tokens).
        owner: the object that frees ``vocab`` when collected (the ``Llama``): held here,
            so a background build never reads a freed vocabulary.

    Every end-of-generation token of the vocabulary (``llama_vocab_is_eog``) may end
    an answer the grammar accepts.
    """

    def __init__(self, vocab: Any, n_vocab: int, owner: Any = None) -> None:
        self._vocab, self.n_vocab = vocab, n_vocab
        self._owner = owner  # keeps the model (and so ``vocab``) alive while threads use it
        self._tokenizer: Any = None
        self._eos: frozenset[int] | None = None
        self._closing: ClosingTokens | None = None
        self._lock = threading.Lock()  # the tokenizer
        self._closing_lock = threading.Lock()  # the closing tokens (warm thread vs decode)
        self._cache_lock = threading.Lock()
        self._building: dict[str, Future[Any]] = {}  # digest -> compile in progress
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        self.compile_ms: list[float] = []  # recent compile times, for diagnostics

    def tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (built once, ~1 s)."""
        with self._lock:
            if self._tokenizer is None:
                import llama_cpp
                from llguidance.llamacpp import lltokenizer_from_vocab

                eog = [t for t in range(self.n_vocab)
                       if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
                with warnings.catch_warnings():  # it calls llama_token_get_attr (deprecated)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self.n_vocab,
                                                             eos_token=eog)
            return self._tokenizer

    @property
    def eos(self) -> frozenset[int]:
        """The end-of-generation tokens the matchers accept."""
        if self._eos is None:
            self._eos = frozenset(self.tokenizer().eos_tokens)
        return self._eos

    def closing(self) -> ClosingTokens:
        """The vocabulary's closing tokens, for budget steering (built once)."""
        if self._closing is None:
            with self._closing_lock:
                if self._closing is None:
                    tok = self.tokenizer()
                    self._closing = ClosingTokens.of(self.n_vocab,
                                                     lambda t: tok.decode_bytes([t]))
        return self._closing

    def constraint(self, matcher: Any, budget: int) -> Constraint:
        """What a sampler needs to enforce ``matcher`` on a ``budget``-token answer."""
        tok = self.tokenizer()
        return Constraint(matcher, self.eos, BudgetSteer(self.closing(), budget),
                          lambda t: tok.decode_bytes([t]))

    def warm(self) -> None:
        """Builds the tokenizer view in the background (the first grammar needs it)."""
        self._pool.submit(self.closing)

    def matcher(self, spec: dict[str, Any]) -> Any:
        """A fresh ``llguidance.LLMatcher`` for ``spec``, at the start of the answer.

        Raises:
            GrammarError: the spec does not compile, exceeds the limits, or took longer
                than :data:`COMPILE_TIMEOUT_S`.
        """
        try:
            return self.submit(spec).result(timeout=COMPILE_TIMEOUT_S)
        except FutureTimeout:
            raise GrammarError(TOO_SLOW) from None

    def submit(self, spec: dict[str, Any]) -> Future[Any]:
        """:meth:`matcher`, as a future: compiled in a thread (the GIL is dropped while
        llguidance builds), so a decode loop goes on meanwhile; a cached spec's future
        is already done, and requests for a spec being compiled share that compile.
        Its result raises :class:`GrammarError`."""
        key = digest_of(spec)
        with self._cache_lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                building = None
            else:
                building = self._building.get(key)
                if building is None:
                    building = self._building[key] = self._pool.submit(self._compile, spec, key)
        out: Future[Any] = Future()
        if building is None:
            assert template is not None
            out.set_result(template.deep_copy())
            return out

        def copy(done: Future[Any]) -> None:
            try:
                out.set_result(done.result().deep_copy())
            except BaseException as exc:  # GrammarError, or the pool shutting down
                out.set_exception(exc)

        building.add_done_callback(copy)
        return out

    def _compile(self, spec: dict[str, Any], key: str) -> Any:
        """The template matcher of ``spec``, cached (runs in the pool)."""
        t0 = time.perf_counter()
        try:
            template = self._build(spec)
        except BaseException:
            with self._cache_lock:
                self._building.pop(key, None)
            raise
        ms = (time.perf_counter() - t0) * 1000
        self.compile_ms = [*self.compile_ms[-255:], ms]
        warnings = template.get_grammar_warnings()
        if warnings:
            log.info("grammar %s compiled in %.1f ms; not enforced by the grammar (checked "
                     "on the answer): %s", key[:12], ms, "; ".join(warnings))
        with self._cache_lock:
            self._cache[key] = template
            self._building.pop(key, None)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def _build(self, spec: dict[str, Any]) -> Any:
        from llguidance import LLMatcher, LLParserLimits

        try:
            relax = Relax()
            while True:
                matcher = LLMatcher(self.tokenizer(), grammar_text(spec, relax),
                                    log_level=0, limits=LLParserLimits(**LIMITS_KW))
                more = relaxed(spec, relax, matcher.get_error()) if matcher.is_error() \
                    else None
                if more is None:
                    break
                log.info("grammar %s leaves to the answer check: %s", digest_of(spec)[:12],
                         more)
                relax = more
            if not matcher.is_error():  # the first mask builds the lexer: bound it here
                mask = np.empty((self.n_vocab + 31) // 32, dtype=np.int32)
                matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        except GrammarError:
            raise
        except BaseException as exc:  # pyo3 panics derive from BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise GrammarError(f"{type(exc).__name__}: {exc}"[:500]) from None
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        return matcher


def _reason(error: str) -> str:
    """llguidance's error text on one line: ``regex parse error in '(?=a)b': look-around,
    including look-ahead and look-behind, is not supported``."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid grammar"
    head = lines[0].removeprefix("Error: ")
    detail = next((line for line in reversed(lines) if line.startswith("error:")), None)
    if detail is not None and len(lines) >= 3:
        head = f"{head.rstrip(':')} in {lines[1]!r}: {detail.removeprefix('error: ')}"
    return head[:500]


@dataclass
class Constraint:
    """A sequence's grammar: its matcher, the end-of-generation tokens it accepts, its
    budget steering (:mod:`fmserve.engines.steering`) and token → bytes."""

    matcher: Any
    eos: frozenset[int]
    steer: BudgetSteer
    piece: Callable[[int], bytes]


class Mask:
    """A token bitmask buffer for one vocabulary, applied to logits in place."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.words = np.empty((n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self, matcher: Any) -> np.ndarray:
        """Booleans (n_vocab): which tokens ``matcher`` allows next.

        Raises:
            GrammarError: the matcher ran out of fuel or entered an error state.
        """
        matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        return bits[:self.n_vocab].astype(bool)

    def apply(self, matcher: Any, logits: np.ndarray) -> None:
        """Sets the logits of disallowed tokens to -inf (``logits``: float32, n_vocab)."""
        logits[~self.allowed(matcher)] = -np.inf


class ConstrainedSampler:
    """A llama.cpp sampler chain whose picks obey a grammar :class:`Constraint`.

    As llama.cpp's ``common_sampler_sample`` does: sample with the chain, check only
    the chosen token against the grammar, and only when it is refused mask the whole
    vocabulary and sample again. The output obeys the grammar either way. Near the
    end of the budget the mask is narrowed to closing tokens first (budget steering).
    """

    def __init__(self, n_vocab: int, chain: Any, constraint: Constraint) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.chain = chain
        self.c = constraint
        self.matcher = constraint.matcher
        self.n_vocab = n_vocab
        self._full = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.ctypeslib.as_array(self._full)  # fields id, logit, p
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._mask = Mask(n_vocab)
        self.rejected = 0  # picks the grammar refused (resampled), for diagnostics

    def _candidates(self, ctx: Any, idx: int) -> Any:
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx.ctx, idx),
                                       shape=(self.n_vocab,))
        self._view["id"] = self._ids
        self._view["logit"] = logits
        self._view["p"] = 0.0
        return self._lib.llama_token_data_array(data=self._full, size=self.n_vocab,
                                                selected=-1, sorted=False)

    def _ok(self, tok: int) -> bool:
        # validate_tokens does not count an end-of-generation token; it may end an
        # answer the grammar accepts.
        if tok in self.c.eos:
            return bool(self.matcher.is_accepting())
        return bool(self.matcher.validate_tokens([tok]) == 1)

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token of the sequence whose logits are row ``idx`` of ``ctx``.

        Raises:
            GrammarError: the matcher failed (limits); the sequence must end.
        """
        lib = self._lib
        arr = self._candidates(ctx, idx)
        steer = self.c.steer
        if steer.active:
            allowed = steer.narrow(self._mask.allowed(self.matcher))
            self._view["logit"][~allowed] = -np.inf
            lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
            tok = int(self._full[arr.selected].id)
        else:
            lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
            tok = int(self._full[arr.selected].id)
            if not self._ok(tok):
                self.rejected += 1
                arr = self._candidates(ctx, idx)
                self._mask.apply(self.matcher, self._view["logit"])
                lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
                tok = int(self._full[arr.selected].id)
        if not self.matcher.consume_token(tok):
            raise GrammarError(_reason(self.matcher.get_error()) or
                               "the grammar refused the sampled token")
        steer.after(self.c.piece(tok))
        lib.llama_sampler_accept(self.chain.sampler, tok)
        return tok

    def close(self) -> None:
        self.chain.close()
