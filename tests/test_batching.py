"""Concurrent requests share worker batches without mixing answers."""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
from conftest import CHAT, EMBED, Server, start_server, stop_server, wait_for

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


# Continuations the model gets right with near certainty: each answer proves it
# belongs to its own prompt, whatever the batch composition.
SEQUENCES = [("1, 2, 3, 4,", "5"), ("a, b, c, d,", "e"), ("Monday, Tuesday, Wednesday,",
             "Thursday"), ("January, February, March,", "April"), ("10, 20, 30, 40,", "50")]


def test_embedding_batches_split_evenly_over_compute_threads() -> None:
    from fmserve.engines.embed_engine import FORWARD_OVERHEAD_TOKENS, split_sorted

    def cost(lengths: list[int], cut: tuple[int, int]) -> int:
        return (cut[1] - cut[0]) * lengths[cut[1] - 1] + FORWARD_OVERHEAD_TOKENS

    def finish(lengths: list[int], cuts: list[tuple[int, int]]) -> int:
        loads = [0, 0]  # two threads, each takes the next slice when free
        for c in cuts:
            loads[loads.index(min(loads))] += cost(lengths, c)
        return max(loads)

    lengths = sorted([7] * 20 + [9] * 8 + [30] * 4)  # 32 requests, a few long texts
    cuts = split_sorted(lengths, 2, 64)
    ordered = sorted(cuts)
    assert ordered[0][0] == 0 and ordered[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(ordered, ordered[1:], strict=False))  # each once
    assert [cost(lengths, c) for c in cuts] == sorted((cost(lengths, c) for c in cuts),
                                                      reverse=True)  # largest first
    by_count = finish(lengths, [(0, 16), (16, 32)])
    best_pair = min(finish(lengths, [(0, i), (i, 32)]) for i in range(1, 32))
    assert finish(lengths, cuts) <= best_pair < by_count  # 218 <= 241 < 496
    assert split_sorted([5] * 32, 2, 64) == [(0, 16), (16, 32)]
    assert split_sorted([3], 4, 64) == [(0, 1)] and split_sorted([], 2, 64) == []
    big = split_sorted(list(range(1, 201)), 2, 64)  # more than threads x batch_size
    assert big == [(0, 64), (64, 128), (128, 192), (192, 200)]


def _post(server: Server, path: str, body: dict) -> dict:  # type: ignore[type-arg]
    with server.client() as c:
        r = c.post(path, json={"model": CHAT, **body})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def test_eight_concurrent_streams_never_mix(server: Server) -> None:
    """Continuous batching: 8 requests decoded together keep their own text and params."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
              "required": ["color"], "additionalProperties": False}
    jobs = [("/serving-endpoints/completions", {"prompt": p, "max_tokens": 12,
                                                "temperature": 0}) for p, _ in SEQUENCES]
    jobs.append(("/serving-endpoints/completions",  # its own stop sequence
                 {"prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": ["7,"]}))
    jobs.append(("/serving-endpoints/chat/completions",  # its own grammar
                 {"messages": [{"role": "user", "content": "Pick a color."}], "max_tokens": 30,
                  "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                      "name": "c", "schema": schema}}}))
    jobs.append(("/serving-endpoints/chat/completions",  # sampled, seeded
                 {"messages": [{"role": "user", "content": "Name three colors."}],
                  "max_tokens": 30, "temperature": 0.8, "seed": 7}))
    solo = [_post(server, path, body) for path, body in jobs[:len(SEQUENCES)]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: _post(server, *job), jobs))
    texts = [a["choices"][0].get("text") or a["choices"][0].get("message", {}).get("content")
             for a in answers]
    for (prompt, expected), text in zip(SEQUENCES, texts, strict=False):
        assert expected in text.split(",")[0], (prompt, text)
    assert answers[5]["choices"][0]["finish_reason"] == "stop"
    assert "7" not in texts[5] and "5" in texts[5], texts[5]
    jsonschema.validate(json.loads(texts[6]), schema)
    assert texts[7]
    # Batched arithmetic may make greedy decoding drift from the solo answer: counted.
    identical = sum(a["choices"][0]["text"] == s["choices"][0]["text"]
                    for a, s in zip(answers, solo, strict=False))
    print(f"\n{identical}/{len(solo)} batched greedy answers identical to their solo answers")


def test_kv_cache_full_answers_503_not_a_hang(tmp_path: Path) -> None:
    srv = start_server(tmp_path, env_extra={"FMSERVE_N_CTX": "512",
                                            "FMSERVE_LLAMA_MAX_SEQS": "4"})
    try:
        prompt = ", ".join(str(i) for i in range(1, 60)) + ","  # ~120 tokens, keeps counting
        body = {"model": CHAT, "prompt": prompt, "max_tokens": 300, "temperature": 0}

        def one(_: int) -> httpx.Response:
            with srv.client() as c:
                return c.post("/serving-endpoints/completions", json=body, timeout=120)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
        codes = sorted(r.status_code for r in results)
        assert 503 in codes and 200 in codes, codes  # 4 x (120 + 300) tokens > 512
        full = next(r for r in results if r.status_code == 503)
        assert full.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert "KV cache" in full.json()["message"] and int(full.headers["Retry-After"]) >= 1
        assert srv.health()["status"] == "ok"
        # The finished requests left their cells as cached prefixes; a request that
        # needs the room gets it (the caches are dropped), not a 503.
        alone = one(0)
        assert alone.status_code == 200, alone.text
        assert alone.json()["usage"]["completion_tokens"] >= 200
    finally:
        stop_server(srv)


def test_long_prefill_is_chunked_between_decode_steps() -> None:
    """While a long prompt is evaluated, a running stream keeps getting tokens: the
    prompt goes in prefill_chunk-token slices between its decode steps."""
    from fmserve.engines.bundled import smollm2_gguf
    from fmserve.engines.llama_batched import BatchedLlamaEngine
    from fmserve.engines.worker_main import CancelSet

    engine = BatchedLlamaEngine({"model_path": str(smollm2_gguf()), "n_ctx": 2048,
                                 "n_threads": 2, "max_seqs": 2, "prefill_chunk": 32})
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    tokens: dict[str, list[float]] = {"a": [], "b": []}
    ends: dict[str, dict[str, Any]] = {}

    def emit(ev: dict[str, Any]) -> None:
        if ev["t"] == "tok":
            tokens[ev["id"]].append(time.perf_counter())
        elif ev["t"] in ("end", "err"):
            ends[ev["id"]] = ev

    runner = threading.Thread(target=engine.run, args=(inbox, CancelSet(), emit))
    runner.start()
    inbox.put({"op": "generate", "id": "a", "prompt": "1, 2, 3, 4,",
               "params": {"max_tokens": 400, "temperature": 0}})
    wait_for(lambda: len(tokens["a"]) >= 5, 60, "stream a decoding")
    submitted = time.perf_counter()
    long_prompt = " ".join(f"item{i}" for i in range(300))  # ~600 tokens
    inbox.put({"op": "generate", "id": "b", "prompt": long_prompt,
               "params": {"max_tokens": 2, "temperature": 0}})
    inbox.put(None)
    runner.join(timeout=300)
    assert ends["a"]["t"] == ends["b"]["t"] == "end", ends
    first_b = tokens["b"][0]
    during = [t for t in tokens["a"] if submitted <= t <= first_b]
    gaps = np.diff([submitted, *during, first_b])
    # b's prefill took many steps; a got a token between each (not one long pause).
    assert len(during) >= 10, (len(during), first_b - submitted)
    assert gaps.max() < (first_b - submitted) / 5, (gaps.max(), first_b - submitted)
