"""Concurrent requests share worker batches without mixing answers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import EMBED, Server

TEXTS = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["cats", "stocks", "rain", "football", "violins", "volcanoes", "bread", "rockets",
     "tea", "glaciers", "chess", "tomatoes", "satellites", "jazz", "deserts", "bees"])]


def test_concurrent_embedding_requests_are_batched_correctly(server: Server) -> None:
    with server.client() as c:
        solo = {t: np.array(c.post(f"/serving-endpoints/{EMBED}/invocations",
                                   json={"input": t}).json()["data"][0]["embedding"])
                for t in TEXTS[:4]}

    def one(text: str) -> tuple[str, np.ndarray, int]:
        with server.client() as cc:
            body = cc.post(f"/serving-endpoints/{EMBED}/invocations", json={"input": [text]}).json()
            return text, np.array(body["data"][0]["embedding"]), body["usage"]["prompt_tokens"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, TEXTS * 2))
    by_text: dict[str, list[np.ndarray]] = {}
    for text, vec, tokens in results:
        assert vec.shape == (384,) and tokens > 5
        by_text.setdefault(text, []).append(vec)
    for text, vecs in by_text.items():
        # Each answer belongs to its own input: far closer to its twin than to any other.
        assert float(vecs[0] @ vecs[1]) > 0.999
        others = [float(vecs[0] @ v[0]) for t, v in by_text.items() if t != text]
        assert max(others) < 0.99
        if text in solo:
            np.testing.assert_allclose(vecs[0], solo[text], atol=1e-4)
