"""sentence-transformers engine (runs inside a worker process).

Spec options: ``model_path`` (a sentence-transformers folder), ``n_threads``,
``batch_size`` (texts per forward pass, default 64), ``max_batch`` (texts merged from
concurrent requests, default 64) and ``max_wait_ms`` (how long the first request
waits for company, default 3 ms, again after each arrival, up to 8x in all). Loads
offline (``HF_HUB_OFFLINE=1``). Vectors are float32; whether the model normalizes
them (a ``Normalize`` module in its pipeline) is reported in :meth:`info`.

Threads: ``n_threads`` compute threads, each running torch ops single-threaded. A
batch is sorted by token length and cut into 1-3 slices per compute thread, the cut
that pads least and finishes soonest (:func:`split_sorted`). BERT-sized ops are too small
for torch's intra-op threads to scale, and their barriers stall whenever the server
process takes a core: on 2 cores with 32 concurrent one-text clients, 2 intra-op
threads gave 118 texts/s (``bench/bench_batching.py``).
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Emit = Callable[[dict[str, Any]], None]


class EmbeddingEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize

        threads = int(spec.get("n_threads") or os.cpu_count() or 1)
        torch.set_num_threads(1)
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fmserve-embed")
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not thread-safe
        self.model = SentenceTransformer(spec["model_path"], device="cpu")
        self.batch_size = int(spec.get("batch_size") or 64)
        # Dynamic batching across requests: wait up to max_wait_s for more texts.
        self.max_batch = int(spec.get("max_batch") or 64)
        self.max_wait_s = float(spec.get("max_wait_ms") or 3) / 1000
        self.dim = int(self.model.get_sentence_embedding_dimension() or 0)
        self.normalized = any(isinstance(m, Normalize) for m in self.model)
        self.max_seq_length = int(self.model.max_seq_length or 0)
        self._torch = torch

    def info(self) -> dict[str, Any]:
        return {
            "engine": "sentence_transformers",
            "dimensions": self.dim,
            "normalized": self.normalized,
            "max_seq_length": self.max_seq_length,
        }

    def handle(self, msg: dict[str, Any], emit: Emit, cancelled: Callable[[], bool]) -> None:
        self.handle_batch([msg], emit)

    def handle_batch(self, msgs: list[dict[str, Any]], emit: Emit) -> None:
        """Embeds the texts of several requests in one ``encode`` call (dynamic batching)."""
        for m in msgs:
            if m["op"] != "embed":
                raise ValueError(f"sentence_transformers worker cannot do {m['op']!r}")
        texts = [t for m in msgs for t in m["texts"]]
        vecs, lengths = self.encode(texts)
        start = 0
        for m in msgs:
            n = len(m["texts"])
            data = vecs[start:start + n].tobytes()
            tokens = int(lengths[start:start + n].sum())
            start += n
            emit({"t": "emb", "id": m["id"], "b64": base64.b64encode(data).decode("ascii"),
                  "dim": self.dim, "count": n, "prompt_tokens": tokens})

    def encode(self, texts: list[str]) -> tuple[Any, Any]:
        """(float32 vectors, len(texts) x dim; token counts per text), in input order.

        Texts are tokenized once (truncated to ``max_seq_length``), sorted by length
        and cut into groups (:func:`split_sorted`) that run on the compute threads.
        """
        with self._tokenizer_lock:  # padded to the longest text, truncated
            feats = self.model.tokenize(texts)
        lengths = feats["attention_mask"].sum(dim=1).numpy()
        order = np.argsort(lengths, kind="stable")
        groups = split_sorted(lengths[order].tolist(), self.threads, self.batch_size)
        out = np.empty((len(texts), self.dim), dtype="<f4")
        rows = [order[a:b].tolist() for a, b in groups]
        parts = [self._rows(feats, g, int(lengths[g].max())) for g in rows]
        for g, vecs in zip(rows, self._pool.map(self._forward, parts), strict=True):
            out[g] = vecs
        return out, lengths

    def _rows(self, feats: dict[str, Any], rows: list[int], width: int) -> dict[str, Any]:
        """The features of ``rows``, cut to ``width`` tokens (padding is on the right)."""
        idx = self._torch.tensor(rows)
        cut = self.model.tokenizer.padding_side == "right"
        return {k: (v[idx, :width] if cut and v.dim() == 2 else v[idx])
                if isinstance(v, self._torch.Tensor) else v for k, v in feats.items()}

    def _forward(self, features: dict[str, Any]) -> Any:
        with self._torch.inference_mode():
            return self.model.forward(features)["sentence_embedding"].float().numpy()


# A forward pass costs about as much as this many more padded tokens (Python and op
# dispatch): all-MiniLM-L6-v2 on one thread, 1 text 9.6 ms, 4 texts 25 ms, ~3,800
# tokens/s.
FORWARD_OVERHEAD_TOKENS = 16


def split_sorted(lengths: list[int], threads: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` slices of ascending token ``lengths``, each run as one
    forward pass padded to its longest text, largest first (the thread pool then
    hands the next largest to whichever thread frees first).

    Up to ``threads * batch_size`` texts: for ``m`` = 1, 2 and 3 slices per thread,
    the cut whose costliest slice is cheapest (cost = texts x longest length +
    :data:`FORWARD_OVERHEAD_TOKENS`); of those, the one that finishes soonest on
    ``threads`` threads. More slices pad less (32 random one-sentence texts split
    16/16 by count pad 22 % more tokens than they hold) but each pass has its fixed
    cost. More texts: slices of ``batch_size``, which the pool balances by itself.
    """
    n = len(lengths)
    if n == 0:
        return []
    if n > threads * batch_size:
        return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    def cost(a: int, b: int) -> int:
        return (b - a) * lengths[b - 1] + FORWARD_OVERHEAD_TOKENS

    def within(limit: int, m: int) -> list[tuple[int, int]] | None:
        """The longest slices whose cost stays within ``limit``, if at most ``m``."""
        out, a = [], 0
        while a < n:
            b = a + 1
            while b < n and cost(a, b + 1) <= limit:
                b += 1
            out.append((a, b))
            a = b
        return out if len(out) <= m else None

    plans = []
    for m in sorted({min(n, k * threads) for k in (1, 2, 3)}):
        lo, hi = cost(n - 1, n), cost(0, n)
        while lo < hi:  # the least limit that m slices can keep
            mid = (lo + hi) // 2
            if within(mid, m) is None:
                lo = mid + 1
            else:
                hi = mid
        cuts = sorted(within(lo, m) or [(0, n)], key=lambda c: -cost(*c))
        loads = [0] * threads
        for c in cuts:  # largest first onto the least loaded thread
            loads[loads.index(min(loads))] += cost(*c)
        plans.append((max(loads), len(cuts), cuts))
    return min(plans)[2]
