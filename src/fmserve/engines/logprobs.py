"""Token log-probabilities: computed in the llama.cpp worker, shaped for the APIs.

The worker computes, for each generated token, ``log_softmax(logits)`` of the
model's raw next-token distribution (before temperature, top-k/p, penalties and
grammar — what OpenAI reports too) and emits one *entry* per token, already in
the chat API's shape (OpenAI API reference, "The chat completion object" →
``choices[].logprobs.content[]``)::

    {"token": str, "logprob": float, "bytes": [int],
     "top_logprobs": [{"token": str, "logprob": float, "bytes": [int]}]}

``token`` is the token's text (UTF-8, a split multi-byte character shown as
U+FFFD); ``bytes`` its exact bytes. ``top_logprobs`` holds the ``k`` most likely
tokens, most likely first (empty for ``k = 0``).

:func:`completion_logprobs` turns entries into the legacy completions shape
(OpenAI "The completion object" → ``choices[].logprobs``): ``tokens``,
``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` dict per token) and
``text_offset`` (characters from the start of the generated text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MAX_TOP_LOGPROBS = 20


class LogprobReader:
    """Reads one row of llama.cpp logits and returns a token's entry.

    ``logits_row(i)`` returns a ctypes ``float*`` to row ``i`` of the last
    ``llama_decode`` output (``llama_get_logits_ith``); ``detok(token) -> bytes``.
    """

    def __init__(self, n_vocab: int, logits_row: Callable[[int], Any],
                 detok: Callable[[int], bytes]) -> None:
        self.n_vocab = n_vocab
        self._row = logits_row
        self._detok = detok
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    def _piece(self, tok: int) -> tuple[str, list[int]]:
        hit = self._pieces.get(tok)
        if hit is None:
            raw = self._detok(tok)
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            if len(self._pieces) < 65536:
                self._pieces[tok] = hit
        return hit

    def entry(self, row: int, tok: int, top: int) -> dict[str, Any]:
        """The entry of sampled token ``tok`` from logits row ``row`` with ``top``
        alternatives (0–20)."""
        logits = np.ctypeslib.as_array(self._row(row), shape=(self.n_vocab,))
        m = float(logits.max())
        lse = m + float(np.log(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64)))
        text, raw = self._piece(tok)
        out: dict[str, Any] = {"token": text, "logprob": float(logits[tok]) - lse,
                               "bytes": raw, "top_logprobs": []}
        if top > 0:
            best = np.argpartition(logits, -top)[-top:]
            best = best[np.argsort(-logits[best], kind="stable")]
            for t in best.tolist():
                t_text, t_raw = self._piece(t)
                out["top_logprobs"].append({"token": t_text, "logprob": float(logits[t]) - lse,
                                            "bytes": t_raw})
        return out


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    """Chat-shaped entries → the legacy completions ``logprobs`` object.

    ``offset``: characters of generated text before the first entry (for streamed
    chunks after the first).
    """
    text_offset = []
    pos = offset
    for e in entries:
        text_offset.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                         for e in entries],
        "text_offset": text_offset,
    }
