"""The ``fmserve`` command line, run as a user runs it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from conftest import CHAT, EMBED, Server, fmserve_cmd, free_port


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fmserve_cmd() + list(args), capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_admin_token_and_tokens_commands(tmp_path: Path, gateway: Server) -> None:
    """``fmserve admin-token`` works on a data dir; ``fmserve tokens`` is an API client."""
    made = cli("admin-token", "--comment", "ci robot", env={"FMSERVE_HOME": str(tmp_path)})
    assert made.returncode == 0, made.stderr
    boot = made.stdout.strip().splitlines()[-1]
    assert boot.startswith("dapi") and len(boot) == 36
    db = sqlite3.connect(tmp_path / "fmserve.db")  # only the hash is stored
    dump = "\n".join(db.iterdump())
    db.close()
    assert boot not in dump and "admin@fmserve.local" in dump

    env = {"DATABRICKS_HOST": gateway.url, "DATABRICKS_TOKEN": gateway.token,
           "COLUMNS": "200"}
    made = cli("tokens", "create", "--comment", "ci robot", "--lifetime-seconds", "600",
               env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("dapi") and len(token) == 36
    token_id = made.stderr.split("Created token ")[1].split(".")[0]
    listed = cli("tokens", "list", env=env)
    assert "ci robot" in listed.stdout and token_id in listed.stdout
    assert token not in listed.stdout
    everyone = cli("tokens", "list", "--all", env=env)
    assert token_id in everyone.stdout and "admin@fmserve.local" in everyone.stdout
    assert httpx.get(f"{gateway.url}/api/2.0/token/list",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert cli("tokens", "revoke", token_id, env=env).returncode == 0
    assert httpx.get(f"{gateway.url}/api/2.0/token/list",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 401
    gone = cli("tokens", "delete", "nope", env=env)
    assert gone.returncode == 1 and "RESOURCE_DOES_NOT_EXIST" in gone.stderr


def test_query_and_endpoints_list(server: Server) -> None:
    env = {"DATABRICKS_HOST": server.url, "DATABRICKS_TOKEN": server.token,
           "COLUMNS": "200"}
    eps = cli("endpoints", "list", env=env)
    assert eps.returncode == 0, eps.stderr
    assert CHAT in eps.stdout and EMBED in eps.stdout and "READY" in eps.stdout
    chat = cli("query", CHAT, "Say hello.", "--max-tokens", "8", "--temperature", "0", env=env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    assert "completion tokens" in chat.stderr
    emb = cli("query", EMBED, "an embedding", env=env)
    assert emb.returncode == 0, emb.stderr
    assert "384" in emb.stdout
    missing = cli("query", "no-such-endpoint", "x", env=env)
    assert missing.returncode == 1 and "RESOURCE_DOES_NOT_EXIST" in missing.stderr
    no_token = cli("endpoints", "list", env={"DATABRICKS_HOST": server.url,
                                             "DATABRICKS_TOKEN": ""})
    assert no_token.returncode == 2 and "fmserve admin-token" in no_token.stderr


def test_first_serve_prints_an_admin_token_once() -> None:
    with tempfile.TemporaryDirectory(prefix="fmserve-first-") as tmp:
        env = {**os.environ, "FMSERVE_HOME": tmp}
        env.pop("DATABRICKS_TOKEN", None)

        def serve_once() -> str:
            port = free_port()
            log = Path(tmp) / f"serve-{port}.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen(fmserve_cmd() + ["serve", "--port", str(port)], env=env,
                                        stdout=f, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.25)
                out = log.read_text()
                token = next((ln.split("=", 1)[1].strip() for ln in out.splitlines()
                              if "export DATABRICKS_TOKEN=" in ln), "")
                if token:
                    r = httpx.post(f"http://127.0.0.1:{port}/serving-endpoints/{EMBED}/invocations",
                                   json={"input": "hi"},
                                   headers={"Authorization": f"Bearer {token}"})
                    assert r.status_code == 200, r.text
                return token
            finally:
                proc.terminate()
                proc.wait(timeout=30)

        assert serve_once().startswith("dapi")
        assert serve_once() == ""  # printed once only


def test_endpoints_create_get_update_delete(server: Server, tmp_path: Path) -> None:
    import json

    env = {"DATABRICKS_HOST": server.url, "DATABRICKS_TOKEN": server.token, "COLUMNS": "200"}
    spec = tmp_path / "endpoint.json"
    spec.write_text(json.dumps({"name": "cli-chat", "config": {"served_entities": [
        {"name": "smol", "entity_name": "system.ai.smollm2-135m-instruct",
         "entity_version": "1"}]}}))
    made = cli("endpoints", "create", "--file", str(spec), env=env)
    assert made.returncode == 0, made.stderr
    assert "cli-chat" in made.stdout and "DEPLOYMENT_READY" in made.stdout
    again = cli("endpoints", "create", "--file", str(spec), env=env)
    assert again.returncode == 1 and "RESOURCE_ALREADY_EXISTS" in again.stderr
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"served_entities": [
        {"name": "smol2", "entity_name": "system.ai.smollm2-135m-instruct",
         "entity_version": "2"}]}))
    upd = cli("endpoints", "update-config", "cli-chat", "--file", str(cfg), env=env)
    assert upd.returncode == 0, upd.stderr
    assert "smol2" in upd.stdout
    got = cli("endpoints", "get", "cli-chat", "--json", env=env)
    assert json.loads(got.stdout)["config"]["config_version"] == 2
    assert cli("endpoints", "delete", "cli-chat", env=env).returncode == 0
    assert "cli-chat" not in cli("endpoints", "list", env=env).stdout
