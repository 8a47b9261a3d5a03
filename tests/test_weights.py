"""Which weights a llama.cpp worker loads (``engines/weights.py``): the bundled
SmolLM2 is served from a BF16 or Q8_0 copy of its Q4_1 GGUF, a user's ``.gguf`` as is, and
``environment_vars.FMSERVE_LLAMA_WEIGHTS`` picks another type per served entity.
Conversions are real (``llama_model_quantize``) and the converted model generates."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import CHAT, Server, start_server, stop_server, wait_for

from fmserve.engines import weights
from fmserve.engines.bundled import smollm2_gguf

API = "/api/2.0/serving-endpoints"


def test_choices_and_cpu_resolution() -> None:
    assert weights.check_weights(" BF16 ") == "bf16"
    with pytest.raises(ValueError, match="FMSERVE_LLAMA_WEIGHTS must be one of"):
        weights.check_weights("q3_zz")
    assert weights.resolve_type("gguf") is None
    assert weights.resolve_type("auto") == ("bf16" if weights.cpu_has_bf16() else "q8_0")
    assert weights.resolve_type("Q8_0") == "q8_0"


def test_prepare_converts_once_and_caches(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = str(smollm2_gguf())
    assert weights.prepare(src, "gguf") == src
    out = weights.prepare(src, "q8_0", threads=2)
    assert Path(out).parent == tmp_path / "fmserve" / "models" and out.endswith(".q8_0.gguf")
    first = os.stat(out).st_mtime_ns
    assert weights.prepare(src, "q8_0") == out and os.stat(out).st_mtime_ns == first
    # Q8_0 of the 4-bit file: larger, and not a temp file left behind
    assert os.path.getsize(out) > os.path.getsize(src)
    assert sorted(p.suffix for p in Path(out).parent.iterdir()) == [".gguf", ".lock"]


def test_prepare_rejects_a_file_llama_cannot_read(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(RuntimeError, match="could not convert junk.gguf to bf16"):
        weights.prepare(str(junk), "bf16")
    assert not list((tmp_path / "cache" / "fmserve" / "models").glob("*.gguf"))


def test_unwritable_cache_serves_the_file_as_is(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    src = str(smollm2_gguf())
    assert weights.prepare(src, "bf16") == src
    assert "loading SmolLM2-135M-Instruct.Q4_1.gguf as it is" in capsys.readouterr().out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("weights"), {"FMSERVE_LLAMA_THREADS": "1"})
    try:
        yield srv
    finally:
        stop_server(srv)


def _log(c: httpx.Client, endpoint: str, entity: str) -> str:
    r = c.get(f"{API}/{endpoint}/served-models/{entity}/logs")
    assert r.status_code == 200, r.text
    return str(r.json()["logs"])


def test_bundled_model_is_served_from_a_converted_copy(server: Server) -> None:
    kind = weights.resolve_type("auto")
    with server.client() as c:
        ep = c.get(f"{API}/{CHAT}").json()
        entity = ep["config"]["served_entities"][0]["name"]
        log = wait_for(lambda: next((lg for lg in [_log(c, CHAT, entity)]
                                     if "worker ready" in lg), None),
                       what="the bundled worker's ready line")
        assert f".{kind}.gguf" in log, log
        r = c.post(f"/serving-endpoints/{CHAT}/invocations", json={
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
        assert r.json()["choices"][0]["message"]["content"].strip()


def test_entity_environment_vars_pick_the_weights(server: Server) -> None:
    name = "weights-q8"
    body = {"name": name, "config": {"served_entities": [
        {"name": "as-is", "entity_name": str(smollm2_gguf())},
        {"name": "q8", "entity_name": str(smollm2_gguf()),
         "environment_vars": {"FMSERVE_LLAMA_WEIGHTS": "q8_0"}}],
        "traffic_config": {"routes": [{"served_entity_name": "as-is", "traffic_percentage": 50},
                                      {"served_entity_name": "q8", "traffic_percentage": 50}]}}}
    with server.client() as c:
        r = c.post(API, json=body)
        assert r.status_code == 200, r.text
        try:
            wait_for(lambda: c.get(f"{API}/{name}").json()["state"]["ready"] == "READY",
                     what=f"{name} ready")
            assert ".q8_0.gguf" in _log(c, name, "q8")
            as_is = _log(c, name, "as-is")
            assert smollm2_gguf().name in as_is and ".gguf'" in as_is
            assert ".q8_0.gguf" not in as_is and ".bf16.gguf" not in as_is
            for entity in ("as-is", "q8"):
                r = c.post(f"/serving-endpoints/{name}/served-models/{entity}/invocations",
                           json={"prompt": "Monday, Tuesday, Wednesday,", "max_tokens": 3,
                                 "temperature": 0})
                assert r.status_code == 200, r.text
                assert "thursday" in r.json()["choices"][0]["text"].lower()
            got = c.get(f"{API}/{name}").json()["config"]["served_entities"]
            env = {e["name"]: e.get("environment_vars") for e in got}
            assert env["q8"] == {"FMSERVE_LLAMA_WEIGHTS": "q8_0"}
        finally:
            c.delete(f"{API}/{name}")
