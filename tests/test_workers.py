"""Supervised engine workers: crash and restart, client disconnects, bounded queues.

Each test here starts its own server, because it breaks things on purpose.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import CHAT, EMBED, Server, start_server, stop_server, wait_for

# At temperature 0 SmolLM2 keeps counting for thousands of tokens: a long, busy request.
LONG = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 3000, "temperature": 0}


@pytest.fixture()
def own_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    env = getattr(request, "param", None) or {}
    with tempfile.TemporaryDirectory(prefix="fmserve-w-") as tmp:
        srv = start_server(Path(tmp), env_extra=env)
        try:
            yield srv
        finally:
            stop_server(srv)


def _worker(srv: Server, entity: str) -> dict:  # type: ignore[type-arg]
    return next(w for w in srv.health()["workers"] if w["entity"] == entity)


def _cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _assert_idle(pid: int) -> None:
    """The worker is not decoding: it burns (almost) no CPU over a second.

    A decoding llama.cpp worker uses about one CPU second per second per thread.
    """
    before = _cpu_seconds(pid)
    time.sleep(1.5)
    used = _cpu_seconds(pid) - before
    assert used < 0.3, f"worker still busy: {used:.2f} CPU s in 1.5 s"




def test_worker_crash_gives_503_and_restarts(own_server: Server) -> None:
    srv = own_server
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        with srv.client() as c:
            result["r"] = c.post(f"/serving-endpoints/{CHAT}/invocations", json=LONG)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: _worker(srv, CHAT)["outstanding"] == 1, what="request in flight")
    time.sleep(0.5)  # let it decode a little
    pid = _worker(srv, CHAT)["pid"]
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive(), "in-flight request hung after the worker died"
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "signal 9" in r.json()["message"]
    assert int(r.headers["Retry-After"]) >= 1

    with srv.client() as c:
        # The server and the other endpoint keep answering meanwhile.
        emb = c.post(f"/serving-endpoints/{EMBED}/invocations", json={"input": "still up"})
        assert emb.status_code == 200
        assert len(emb.json()["data"][0]["embedding"]) == 384
        # The worker comes back (new pid) and answers again.
        wait_for(lambda: _worker(srv, CHAT)["state"] == "ready", what="worker restart")
        w = _worker(srv, CHAT)
        assert w["pid"] != pid and w["restarts"] == 1
        ok = c.post(f"/serving-endpoints/{CHAT}/invocations",
                    json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1


def test_worker_crash_mid_stream_ends_with_error_event(own_server: Server) -> None:
    srv = own_server
    events: list[str] = []
    with srv.client() as c, c.stream("POST", f"/serving-endpoints/{CHAT}/invocations",
                                     json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 5:
                os.kill(_worker(srv, CHAT)["pid"], signal.SIGKILL)
                break
        events.extend(line for line in lines if line)
    assert all(e.startswith("data: ") for e in events), "only data: lines are allowed"
    assert events[-1] == "data: [DONE]"
    assert "TEMPORARILY_UNAVAILABLE" in events[-2]


def test_client_disconnect_mid_stream_frees_worker(own_server: Server) -> None:
    srv = own_server
    with srv.client() as c:
        with c.stream("POST", f"/serving-endpoints/{CHAT}/invocations",
                      json={**LONG, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break  # leave mid-stream: closing the response drops the connection
        wait_for(lambda: _worker(srv, CHAT)["outstanding"] == 0, timeout_s=10,
              what="the cancelled stream to be released")
        # The worker stopped decoding the ~3000 tokens the abandoned stream asked for,
        # and answers the next request.
        _assert_idle(_worker(srv, CHAT)["pid"])
        r2 = c.post(f"/serving-endpoints/{CHAT}/invocations",
                    json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r2.status_code == 200


def test_client_disconnect_non_streaming_frees_worker(own_server: Server) -> None:
    srv = own_server
    with pytest.raises(httpx.ReadTimeout), srv.client() as c:
        c.post(f"/serving-endpoints/{CHAT}/invocations", json=LONG, timeout=1.0)
    wait_for(lambda: _worker(srv, CHAT)["outstanding"] == 0, timeout_s=10,
          what="the abandoned request to be cancelled")
    _assert_idle(_worker(srv, CHAT)["pid"])
    with srv.client() as c:
        r = c.post("/serving-endpoints/completions",
                   json={"model": CHAT, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("own_server", [{"FMSERVE_MAX_QUEUE": "1"}], indirect=True)
def test_full_queue_answers_503_with_retry_after(own_server: Server) -> None:
    srv = own_server
    threads = []
    results: list[int] = []

    def call() -> None:
        with srv.client() as c:
            results.append(c.post(f"/serving-endpoints/{CHAT}/invocations",
                                  json={**LONG, "max_tokens": 150}).status_code)

    for _ in range(2):  # one running, one queued: the worker is full
        threads.append(threading.Thread(target=call))
        threads[-1].start()
    wait_for(lambda: _worker(srv, CHAT)["outstanding"] == 2, what="a full worker")
    with srv.client() as c:
        started = time.monotonic()
        r = c.post(f"/serving-endpoints/{CHAT}/invocations", json=LONG)
        assert time.monotonic() - started < 5, "a full queue must answer at once"
    assert r.status_code == 503
    assert r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert int(r.headers["Retry-After"]) >= 1
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200]
