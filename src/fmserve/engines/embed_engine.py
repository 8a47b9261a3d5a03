"""sentence-transformers engine (runs inside a worker process).

Spec options: ``model_path`` (a sentence-transformers folder), ``n_threads``,
``batch_size`` (texts per forward pass, default 64), ``max_batch`` (texts merged from
concurrent requests, default 64) and ``max_wait_ms`` (how long the first request
waits for company, default 3 ms). Loads offline
(``HF_HUB_OFFLINE=1``). Vectors are float32; whether the model normalizes them
(a ``Normalize`` module in its pipeline) is reported in :meth:`info`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

Emit = Callable[[dict[str, Any]], None]


class EmbeddingEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.models import Normalize

        threads = int(spec.get("n_threads") or os.cpu_count() or 1)
        torch.set_num_threads(threads)
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
        ids = self.model.tokenizer(
            texts, add_special_tokens=True, truncation=True, max_length=self.max_seq_length
        )["input_ids"]
        with self._torch.inference_mode():
            vecs = self.model.encode(
                texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            ).astype("<f4", copy=False)
        start = 0
        for m in msgs:
            n = len(m["texts"])
            data = vecs[start:start + n].tobytes()
            tokens = sum(len(x) for x in ids[start:start + n])
            start += n
            emit({"t": "emb", "id": m["id"], "b64": base64.b64encode(data).decode("ascii"),
                  "dim": self.dim, "count": n, "prompt_tokens": tokens})
