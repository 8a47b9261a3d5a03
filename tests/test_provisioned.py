"""Provisioned throughput replicas, scale-to-zero and fallback, on a real server."""

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
from conftest import Server, start_server, stop_server, wait_for

MODEL = "system.ai.smollm2-135m-instruct"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="fmserve-pt-") as tmp:
        s = start_server(Path(tmp), env_extra={"FMSERVE_SCALE_TO_ZERO_IDLE_S": "2"})
        try:
            yield s
        finally:
            stop_server(s)


def _create(c: httpx.Client, name: str, entities: list[dict], **extra) -> dict:  # type: ignore[type-arg]
    r = c.post("/api/2.0/serving-endpoints",
               json={"name": name, "config": {"served_entities": entities, **extra.pop(
                   "config_extra", {})}, **extra})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ep = c.get(f"/api/2.0/serving-endpoints/{name}").json()
        if ep["state"]["config_update"] != "IN_PROGRESS":
            assert ep["state"]["config_update"] == "NOT_UPDATING", ep
            return ep  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"{name} did not deploy")


def _pool(srv: Server, prefix: str) -> dict:  # type: ignore[type-arg]
    return next(w for w in srv.health()["workers"] if w["entity"].startswith(prefix))




def test_optimization_info_and_pt_validation(srv: Server) -> None:
    with srv.client() as c:
        info = c.get("/api/2.0/serving-endpoints/get-model-optimization-info/"
                     f"{MODEL}/1").json()
        assert info["optimizable"] is True and info["throughput_chunk_size"] > 0
        chunk = info["throughput_chunk_size"]
        for bad in ({"min_provisioned_throughput": chunk + 1,
                     "max_provisioned_throughput": 2 * chunk},
                    {"min_provisioned_throughput": 2 * chunk,
                     "max_provisioned_throughput": chunk},
                    {"workload_size": "Gigantic"}):
            r = c.post("/api/2.0/serving-endpoints", json={
                "name": "pt-bad", "config": {"served_entities": [
                    {"entity_name": MODEL, "entity_version": "1", **bad}]}})
            assert r.status_code == 400, r.text
            assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert c.get("/api/2.0/serving-endpoints/pt-bad").status_code == 404


def test_provisioned_throughput_scales_up_under_load(srv: Server) -> None:
    with srv.client() as c:
        chunk = c.get("/api/2.0/serving-endpoints/get-model-optimization-info/"
                      f"{MODEL}/1").json()["throughput_chunk_size"]
        ep = _create(c, "pt-scale", [{"name": "smol", "entity_name": MODEL, "entity_version": "1",
                                      "min_provisioned_throughput": chunk,
                                      "max_provisioned_throughput": 2 * chunk}])
        assert ep["config"]["served_entities"][0]["max_provisioned_throughput"] == 2 * chunk
        assert _pool(srv, "pt-scale/")["replicas"] == 1
        codes: list[int] = []

        def call() -> None:
            with srv.client() as cc:
                codes.append(cc.post("/serving-endpoints/pt-scale/invocations", json={
                    "prompt": "1, 2, 3, 4,", "max_tokens": 60, "temperature": 0}).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: _pool(srv, "pt-scale/")["replicas"] == 2)
        for t in threads:
            t.join(timeout=120)
        assert codes == [200] * 6
        assert len(set(_pool(srv, "pt-scale/")["pids"])) == 2
        c.delete("/api/2.0/serving-endpoints/pt-scale")


def test_scale_to_zero_and_cold_start(srv: Server) -> None:
    with srv.client() as c:
        _create(c, "stz", [{"name": "smol", "entity_name": MODEL, "entity_version": "1",
                            "scale_to_zero_enabled": True}])
        wait_for(lambda: _pool(srv, "stz/")["replicas"] == 0, timeout_s=30)
        ep = c.get("/api/2.0/serving-endpoints/stz").json()
        assert ep["state"]["ready"] == "READY"  # scaled to zero is still servable
        r = c.post("/serving-endpoints/stz/invocations", json={"prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text  # the request waited for the cold start
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert _pool(srv, "stz/")["replicas"] == 1
        c.delete("/api/2.0/serving-endpoints/stz")


def _kill_mid_request(srv: Server, c: httpx.Client, wait_ready: bool = False) -> httpx.Response:
    """Sends a long request to endpoint 'fb' and kills entity a's worker while it runs."""
    if wait_ready:
        wait_for(lambda: _pool(srv, "fb/a")["state"] == "ready")
    results: list[httpx.Response] = []
    body = {"prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0}
    t = threading.Thread(target=lambda: results.append(
        c.post("/serving-endpoints/fb/invocations", json=body)))
    t.start()
    wait_for(lambda: _pool(srv, "fb/a")["outstanding"] == 1)
    os.kill(_pool(srv, "fb/a")["pid"], signal.SIGKILL)
    t.join(timeout=120)
    return results[0]


def test_fallback_to_next_entity_when_worker_dies(srv: Server) -> None:
    with srv.client() as c:
        _create(c, "fb", [{"name": "a", "entity_name": MODEL, "entity_version": "1"},
                          {"name": "b", "entity_name": MODEL, "entity_version": "1"}],
                config_extra={"traffic_config": {"routes": [
                    {"served_model_name": "a", "traffic_percentage": 100},
                    {"served_model_name": "b", "traffic_percentage": 0}]}},
                ai_gateway={"fallback_config": {"enabled": True}})
        # Entity a dies mid-request: the next entity in list order, b, answers.
        r = _kill_mid_request(srv, c)
        assert r.status_code == 200, r.text
        assert r.headers["served-model-name"] == "b"
        # Without fallback the same failure is a 503.
        c.put("/api/2.0/serving-endpoints/fb/ai-gateway",
              json={"fallback_config": {"enabled": False}})
        assert _kill_mid_request(srv, c, wait_ready=True).status_code == 503
        c.delete("/api/2.0/serving-endpoints/fb")
