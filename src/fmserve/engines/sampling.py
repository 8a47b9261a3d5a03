"""Per-sequence samplers for the batched llama.cpp engine.

:func:`build_sampler` builds the chain ``Llama._init_sampler`` builds (penalties,
top-k, typical, top-p, min-p, temperature, seeded dist; greedy at temperature 0).

With a grammar (an llguidance matcher, :mod:`fmserve.engines.grammar`), the chain
is wrapped in a :class:`~fmserve.engines.grammar.ConstrainedSampler`: it samples
first and masks the vocabulary only when the grammar refuses the pick, as
llama.cpp's own ``common_sampler_sample`` does (``grammar_first = false``).
"""

from __future__ import annotations

import random
from typing import Any

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 40


def reproducible(params: dict[str, Any]) -> bool:
    """Greedy (temperature 0) or seeded: the answer must not depend on earlier requests,
    so the engines evaluate such a prompt in full instead of reusing cached cells."""
    temp = params.get("temperature")
    return params.get("seed") is not None or (temp is not None and float(temp) == 0.0)


def build_sampler(n_vocab: int, params: dict[str, Any], constraint: Any = None) -> Any:
    """A sampler for one sequence: ``sample(ctx, idx) -> token`` (accepts the token
    into its state) and ``close()``. ``constraint``: a grammar
    (:class:`~fmserve.engines.grammar.Constraint`) or None.
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
    if constraint is None:
        return s
    from fmserve.engines.grammar import ConstrainedSampler

    return ConstrainedSampler(n_vocab, s, constraint)
