"""Per-sequence samplers for the batched llama.cpp engine.

:func:`build_sampler` builds the chain ``Llama._init_sampler`` builds (penalties,
top-k, typical, top-p, min-p, temperature, seeded dist; greedy at temperature 0).

With a grammar, putting the grammar sampler first in the chain (as
``Llama.generate`` does) checks every one of the ~49k vocabulary tokens against the
grammar at every step, which halves decode speed. :class:`GrammarSampler` does what
llama.cpp's own ``common_sampler_sample`` does instead: sample with the chain, then
check only the chosen token against the grammar; only when the grammar rejects it,
mask the whole vocabulary with the grammar and sample again. The output obeys the
grammar either way; the distribution is the grammar-masked one whenever the first
pick is rejected, and the unmasked one restricted to grammatical picks otherwise
(llama.cpp's default trade-off, ``grammar_first = false``).
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import numpy as np

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 40


def reproducible(params: dict[str, Any]) -> bool:
    """Greedy (temperature 0) or seeded: the answer must not depend on earlier requests,
    so the engines evaluate such a prompt in full instead of reusing cached cells."""
    temp = params.get("temperature")
    return params.get("seed") is not None or (temp is not None and float(temp) == 0.0)


def build_sampler(model: Any, n_vocab: int, params: dict[str, Any], grammar: Any) -> Any:
    """A sampler for one sequence: ``sample(ctx, idx) -> token`` (accepts the token
    into its state) and ``close()``. ``grammar`` is a compiled ``LlamaGrammar`` or None.
    """
    from llama_cpp import _internals

    s = _internals.LlamaSampler()
    s.add_penalties(n_vocab=n_vocab, penalty_last_n=64,
                    penalty_repeat=float(params.get("repeat_penalty") or 1.0),
                    penalty_freq=float(params.get("frequency_penalty") or 0.0),
                    penalty_present=float(params.get("presence_penalty") or 0.0))
    temp = params.get("temperature")
    temp = DEFAULT_TEMPERATURE if temp is None else float(temp)
    seed = params.get("seed")
    seed = int(seed) if seed is not None else random.getrandbits(31)
    if temp == 0.0:
        s.add_greedy()
    else:
        s.add_top_k(int(params.get("top_k") or DEFAULT_TOP_K))
        s.add_typical(1.0, 1)
        s.add_top_p(float(params.get("top_p") or DEFAULT_TOP_P), 1)
        s.add_min_p(float(params.get("min_p") or 0.0), 1)
        s.add_temp(temp)
        s.add_dist(seed)
    if grammar is None:
        return s
    return GrammarSampler(model, n_vocab, s, grammar)


class GrammarSampler:
    """A sampler chain whose picks are checked against a grammar (see module doc)."""

    def __init__(self, model: Any, n_vocab: int, chain: Any, grammar: Any) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.chain = chain
        self.grammar = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        self.n_vocab = n_vocab
        self._full = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.ctypeslib.as_array(self._full)  # fields id, logit, p
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()
        self.rejected = 0  # picks the grammar refused (resampled), for diagnostics

    def _candidates(self, ctx: Any, idx: int) -> Any:
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx.ctx, idx),
                                       shape=(self.n_vocab,))
        self._view["id"] = self._ids
        self._view["logit"] = logits
        self._view["p"] = 0.0
        return self._lib.llama_token_data_array(data=self._full, size=self.n_vocab,
                                                selected=-1, sorted=False)

    def _allowed(self, tok: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0  # type: ignore[assignment]
        arr = self._lib.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        self._lib.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        return not math.isinf(one[0].logit)

    def sample(self, ctx: Any, idx: int) -> int:
        lib = self._lib
        arr = self._candidates(ctx, idx)
        lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
        tok = int(self._full[arr.selected].id)
        if not self._allowed(tok):
            self.rejected += 1
            arr = self._candidates(ctx, idx)
            lib.llama_sampler_apply(self.grammar, ctypes.byref(arr))
            lib.llama_sampler_apply(self.chain.sampler, ctypes.byref(arr))
            tok = int(self._full[arr.selected].id)
        lib.llama_sampler_accept(self.grammar, tok)
        lib.llama_sampler_accept(self.chain.sampler, tok)
        return tok

    def close(self) -> None:
        if self.grammar is not None:
            self._lib.llama_sampler_free(self.grammar)
            self.grammar = None
        self.chain.close()
