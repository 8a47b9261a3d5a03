"""Secrets: the REST API through the real databricks-sdk, the ``fmserve secrets`` CLI, and
``{{secrets/scope/key}}`` / ``*_plaintext`` credentials of external models.

The invariant checked everywhere: a secret value never leaves the server — not in an
API answer, not in the server log, not in /metrics, and not in clear in the database.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, create_external, fmserve_cmd, wait_for
from cryptography.fernet import Fernet
from databricks.sdk import WorkspaceClient
from databricks.sdk.errors import (
    InvalidParameterValue,
    PermissionDenied,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
)
from databricks.sdk.service.workspace import ScopeBackendType
from fakes.openai import external_model, fake
from fakes.server import FakeServer


def _uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture()
def ws(gateway: Server) -> WorkspaceClient:
    return WorkspaceClient(host=gateway.url, token=gateway.token)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeServer]:
    with fake() as srv:
        yield srv


# -- REST API via databricks-sdk -------------------------------------------------------


def test_sdk_scopes_and_secrets(ws: WorkspaceClient) -> None:
    scope = f"sdk-{_uid()}"
    ws.secrets.create_scope(scope)
    scopes = {s.name: s for s in ws.secrets.list_scopes()}
    assert scope in scopes
    assert scopes[scope].backend_type == ScopeBackendType.DATABRICKS

    before = int(time.time() * 1000)
    ws.secrets.put_secret(scope, "api-key", string_value="s3cr3t-string-value")
    ws.secrets.put_secret(scope, "blob", bytes_value=base64.b64encode(b"raw bytes").decode())
    listed = {m.key: m for m in ws.secrets.list_secrets(scope)}
    assert set(listed) == {"api-key", "blob"}
    assert all(m.last_updated_timestamp and m.last_updated_timestamp >= before - 1000
               for m in listed.values())

    time.sleep(0.01)
    ws.secrets.put_secret(scope, "api-key", string_value="rotated-value")  # overwrite
    again = {m.key: m for m in ws.secrets.list_secrets(scope)}
    assert (again["api-key"].last_updated_timestamp or 0) >= (
        listed["api-key"].last_updated_timestamp or 0) > 0

    ws.secrets.delete_secret(scope, "blob")
    assert [m.key for m in ws.secrets.list_secrets(scope)] == ["api-key"]
    ws.secrets.delete_scope(scope)
    assert scope not in {s.name for s in ws.secrets.list_scopes()}
    with pytest.raises(ResourceDoesNotExist):
        list(ws.secrets.list_secrets(scope))


def test_sdk_errors(ws: WorkspaceClient, gateway: Server) -> None:
    scope = f"err-{_uid()}"
    ws.secrets.create_scope(scope, initial_manage_principal="users")
    with pytest.raises(ResourceAlreadyExists, match=scope):
        ws.secrets.create_scope(scope)
    for bad in ("bad name", "a/b", "x" * 129):
        with pytest.raises(InvalidParameterValue):
            ws.secrets.create_scope(bad)
    with pytest.raises(InvalidParameterValue):
        ws.secrets.create_scope(f"akv-{_uid()}",
                                scope_backend_type=ScopeBackendType.AZURE_KEYVAULT)
    with pytest.raises(InvalidParameterValue):
        ws.secrets.put_secret(scope, "bad key!", string_value="v")
    with pytest.raises(InvalidParameterValue):
        ws.secrets.put_secret(scope, "k", string_value="v", bytes_value="dg==")
    with pytest.raises(InvalidParameterValue):
        ws.secrets.put_secret(scope, "k")
    with pytest.raises(InvalidParameterValue):
        ws.secrets.put_secret(scope, "k", bytes_value="not base64!!")
    with pytest.raises(InvalidParameterValue):
        ws.secrets.put_secret(scope, "k", string_value="x" * (128 * 1024 + 1))

    missing = f"nosuch-{_uid()}"
    with pytest.raises(ResourceDoesNotExist, match=missing):
        ws.secrets.put_secret(missing, "k", string_value="v")
    with pytest.raises(ResourceDoesNotExist):
        list(ws.secrets.list_secrets(missing))
    with pytest.raises(ResourceDoesNotExist):
        ws.secrets.delete_scope(missing)
    with pytest.raises(ResourceDoesNotExist):
        ws.secrets.delete_secret(scope, "never-put")

    with httpx.Client(base_url=gateway.url, timeout=30) as anon:
        r = anon.get("/api/2.0/secrets/scopes/list")
        assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHENTICATED"
    with gateway.client() as c:
        r = c.post("/api/2.0/secrets/put", content=b"{not json")
        assert r.status_code == 400 and r.json()["error_code"] == "BAD_REQUEST"
        r = c.get("/api/2.0/secrets/list")
        assert r.status_code == 400 and "scope" in r.json()["message"]
        r = c.post("/api/2.0/secrets/scopes/create", json={"scope": 5})
        assert r.status_code == 400
    ws.secrets.delete_scope(scope)


def test_get_secret_is_refused(ws: WorkspaceClient, gateway: Server) -> None:
    scope, value = f"get-{_uid()}", f"never-returned-{_uid()}"
    ws.secrets.create_scope(scope)
    ws.secrets.put_secret(scope, "k", string_value=value)
    with pytest.raises(PermissionDenied, match="never returns secret values"):
        ws.secrets.get_secret(scope, "k")
    with gateway.client() as c:
        r = c.get("/api/2.0/secrets/get", params={"scope": scope, "key": "k"})
        assert r.status_code == 403
        assert r.json()["error_code"] == "PERMISSION_DENIED"
        assert value not in r.text
        assert value not in c.get("/api/2.0/secrets/list", params={"scope": scope}).text
    ws.secrets.delete_scope(scope)


# -- CLI -----------------------------------------------------------------------------------


def _cli(data_dir: Path, *args: str, stdin: str | None = None,
         env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FMSERVE_SECRETS_KEY", "FMSERVE_DATABASE_URL")}
    env.update(env_extra or {})
    return subprocess.run(fmserve_cmd() + ["secrets", *args, "--data-dir", str(data_dir)],
                          input=stdin if stdin is not None else "", capture_output=True,
                          text=True, env=env, timeout=60)


def _db_bytes(data_dir: Path) -> bytes:
    """The SQLite database as stored (main file and WAL)."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("fmserve.db*")))


def test_cli_secrets(tmp_path: Path) -> None:
    d = tmp_path / "data"
    value, piped = f"cli-value-{_uid()}", f"piped-value-{_uid()}"

    r = _cli(d, "put", "team", "k", "--value", value)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "fmserve secrets create-scope team" in r.stderr

    assert _cli(d, "create-scope", "team").returncode == 0
    r = _cli(d, "create-scope", "team")
    assert r.returncode == 1 and "RESOURCE_ALREADY_EXISTS" in r.stderr
    r = _cli(d, "create-scope", "bad name")
    assert r.returncode == 1 and "INVALID_PARAMETER_VALUE" in r.stderr

    key_file = d / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    r = _cli(d, "put", "team", "k", "--value", value)
    assert r.returncode == 0, r.stderr
    assert "{{secrets/team/k}}" in r.stderr
    r = _cli(d, "put", "team", "piped", stdin=piped + "\n")
    assert r.returncode == 0, r.stderr
    for out in (r.stdout, r.stderr):
        assert piped not in out

    r = _cli(d, "list", "team")
    assert r.returncode == 0 and "k" in r.stdout and "piped" in r.stdout
    assert value not in r.stdout and piped not in r.stdout
    r = _cli(d, "list-scopes")
    assert "team" in r.stdout and "DATABRICKS" in r.stdout

    raw = _db_bytes(d)
    assert value.encode() not in raw and piped.encode() not in raw

    # The server process decrypts what the CLI stored (same data dir, same key file).
    from fmserve.store.db import Database, sqlite_url
    from fmserve.store.secrets import SecretStore, load_key
    db = Database(sqlite_url(d))
    try:
        store = SecretStore(db, load_key(d))
        assert store.value("team", "k") == value
        assert store.value("team", "piped") == piped  # trailing newline of echo dropped
    finally:
        db.close()

    assert _cli(d, "delete", "team", "k").returncode == 0
    r = _cli(d, "delete", "team", "k")
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert _cli(d, "delete-scope", "team").returncode == 0
    r = _cli(d, "list", "team")
    assert r.returncode == 1 and "create-scope team" in r.stderr


def test_cli_key_from_env(tmp_path: Path) -> None:
    d = tmp_path / "data"
    env = {"FMSERVE_SECRETS_KEY": Fernet.generate_key().decode()}
    assert _cli(d, "create-scope", "s", env_extra=env).returncode == 0
    assert _cli(d, "put", "s", "k", "--value", "v" * 8, env_extra=env).returncode == 0
    assert not (d / "secrets.key").exists()
    r = _cli(d, "list-scopes", env_extra={"FMSERVE_SECRETS_KEY": "not-a-key"})
    assert r.returncode == 2 and "FMSERVE_SECRETS_KEY" in r.stderr


# -- external models --------------------------------------------------------------------


def _chat(c: httpx.Client, name: str, text: str = "Say hello") -> httpx.Response:
    return c.post(f"/serving-endpoints/{name}/invocations",
                  json={"messages": [{"role": "user", "content": text}], "max_tokens": 16})


def _assert_nowhere(gateway: Server, value: str, endpoint: str, scope: str | None = None) -> None:
    """``value`` appears in no answer, the server log, or /metrics."""
    with gateway.client() as c:
        answers = [c.get(f"/api/2.0/serving-endpoints/{endpoint}"),
                   c.get("/api/2.0/serving-endpoints"),
                   c.get("/api/2.0/secrets/scopes/list"),
                   httpx.get(f"{gateway.url}/metrics", timeout=30)]
        if scope:
            answers.append(c.get("/api/2.0/secrets/list", params={"scope": scope}))
    for r in answers:
        assert r.status_code == 200, r.text
        assert value not in r.text, r.request.url
    assert value not in gateway.log()


def _bearer(upstream: FakeServer) -> str:
    return upstream.last().headers.get("authorization", "")


def test_secret_reference_credential(gateway: Server, ws: WorkspaceClient,
                                     upstream: FakeServer) -> None:
    scope, value = f"ext-{_uid()}", f"sk-ref-{_uid()}"
    ws.secrets.create_scope(scope)
    ws.secrets.put_secret(scope, "openai", string_value=value)
    model = external_model(upstream.url)
    model["openai_config"] = {"openai_api_key": f"{{{{secrets/{scope}/openai}}}}",
                              "openai_api_base": f"{upstream.url}/v1"}
    name = f"secrets-ref-{_uid()}"
    ep = create_external(gateway, name, model)
    cfg = ep["config"]["served_entities"][0]["external_model"]["openai_config"]
    assert cfg["openai_api_key"] == f"{{{{secrets/{scope}/openai}}}}"  # the reference only

    with gateway.client() as c:
        r = _chat(c, name)
        assert r.status_code == 200, r.text
        assert _bearer(upstream) == f"Bearer {value}"
        r = _chat(c, name, "FAIL:401")  # provider errors pass through the scrubber
        assert r.status_code >= 400 and value not in r.text
        r = c.post(f"/serving-endpoints/{name}/invocations",
                   json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert value not in r.text
    _assert_nowhere(gateway, value, name, scope)
    with gateway.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")
    ws.secrets.delete_scope(scope)


def test_secret_put_by_cli_used_by_server(gateway: Server, upstream: FakeServer) -> None:
    scope, value = f"clisrv-{_uid()}", f"sk-cli-{_uid()}"
    assert _cli(gateway.data_dir, "create-scope", scope).returncode == 0
    assert _cli(gateway.data_dir, "put", scope, "k", stdin=value).returncode == 0
    model = external_model(upstream.url)
    model["openai_config"] = {"openai_api_key": f"{{{{secrets/{scope}/k}}}}",
                              "openai_api_base": f"{upstream.url}/v1"}
    name = f"secrets-cli-{_uid()}"
    create_external(gateway, name, model)
    with gateway.client() as c:
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {value}"
        c.delete(f"/api/2.0/serving-endpoints/{name}")
    assert _cli(gateway.data_dir, "delete-scope", scope).returncode == 0


def test_plaintext_credential_is_sealed(gateway: Server, upstream: FakeServer) -> None:
    value, value2 = f"sk-plain-{_uid()}", f"sk-plain2-{_uid()}"
    model = external_model(upstream.url)
    model["openai_config"]["openai_api_key_plaintext"] = value
    name = f"secrets-plain-{_uid()}"
    ep = create_external(gateway, name, model)
    assert "openai_api_key_plaintext" not in str(ep)
    with gateway.client() as c:
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {value}"
        got = c.get(f"/api/2.0/serving-endpoints/{name}").json()
        assert "openai_api_key_plaintext" not in str(got)

        # A config update seals its plaintext too.
        model["openai_config"]["openai_api_key_plaintext"] = value2
        r = c.put(f"/api/2.0/serving-endpoints/{name}/config",
                  json={"served_entities": [{"external_model": model}]})
        assert r.status_code == 200, r.text
        assert value2 not in r.text
        wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]
                 ["config_update"] == "NOT_UPDATING", timeout_s=30, what="update done")
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {value2}"
    for v in (value, value2):
        _assert_nowhere(gateway, v, name)
        assert v.encode() not in _db_bytes(gateway.data_dir)
    with gateway.client() as c:
        c.delete(f"/api/2.0/serving-endpoints/{name}")


def _ref_model(upstream: FakeServer, ref: str) -> dict[str, Any]:
    model = external_model(upstream.url)
    model["openai_config"] = {"openai_api_key": ref, "openai_api_base": f"{upstream.url}/v1"}
    return model


def test_missing_secret_reference_is_400(gateway: Server, ws: WorkspaceClient,
                                         upstream: FakeServer) -> None:
    scope = f"miss-{_uid()}"
    ws.secrets.create_scope(scope)
    with gateway.client() as c:
        for ref in (f"{{{{secrets/{scope}/absent}}}}", f"{{{{secrets/nosuch-{_uid()}/k}}}}"):
            name = f"secrets-miss-{_uid()}"
            r = c.post("/api/2.0/serving-endpoints", json={
                "name": name,
                "config": {"served_entities": [{"external_model": _ref_model(upstream, ref)}]}})
            assert r.status_code == 400, r.text
            assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
            assert ref in r.json()["message"]
            assert c.get(f"/api/2.0/serving-endpoints/{name}").status_code == 404
            names = {e["name"] for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]}
            assert name not in names
    ws.secrets.delete_scope(scope)


def test_binary_secret_reference_is_400(gateway: Server, ws: WorkspaceClient,
                                        upstream: FakeServer) -> None:
    """A bytes secret that is not UTF-8 text cannot be a credential: a clear 400."""
    scope = f"bin-{_uid()}"
    ws.secrets.create_scope(scope)
    ws.secrets.put_secret(scope, "k", bytes_value=base64.b64encode(b"\xff\xfe\x00").decode())
    ref = f"{{{{secrets/{scope}/k}}}}"
    with gateway.client() as c:
        r = c.post("/api/2.0/serving-endpoints", json={
            "name": f"secrets-bin-{_uid()}",
            "config": {"served_entities": [{"external_model": _ref_model(upstream, ref)}]}})
        assert r.status_code == 400, r.text
        assert ref in r.json()["message"]
    ws.secrets.delete_scope(scope)


def test_rotated_secret_is_used(gateway: Server, ws: WorkspaceClient,
                                upstream: FakeServer) -> None:
    scope, old, new = f"rot-{_uid()}", f"sk-old-{_uid()}", f"sk-new-{_uid()}"
    ws.secrets.create_scope(scope)
    ws.secrets.put_secret(scope, "k", string_value=old)
    name = f"secrets-rot-{_uid()}"
    create_external(gateway, name, _ref_model(upstream, f"{{{{secrets/{scope}/k}}}}"))
    with gateway.client() as c:
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {old}"
        ws.secrets.put_secret(scope, "k", string_value=new)
        start = time.monotonic()

        def rotated() -> bool:
            assert _chat(c, name).status_code == 200
            return _bearer(upstream) == f"Bearer {new}"
        wait_for(rotated, timeout_s=8, what="the rotated secret in use")
        assert time.monotonic() - start < 8
        _assert_nowhere(gateway, new, name)
        c.delete(f"/api/2.0/serving-endpoints/{name}")
    ws.secrets.delete_scope(scope)


def test_rotated_secret_used_after_config_update(gateway: Server, ws: WorkspaceClient,
                                                 upstream: FakeServer) -> None:
    scope, old, new = f"rotu-{_uid()}", f"sk-old-{_uid()}", f"sk-new-{_uid()}"
    ws.secrets.create_scope(scope)
    ws.secrets.put_secret(scope, "k", string_value=old)
    name = f"secrets-rotu-{_uid()}"
    model = _ref_model(upstream, f"{{{{secrets/{scope}/k}}}}")
    create_external(gateway, name, model)
    resolved_at = time.monotonic()
    with gateway.client() as c:
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {old}"
        ws.secrets.put_secret(scope, "k", string_value=new)
        time.sleep(max(0.0, 5.2 - (time.monotonic() - resolved_at)))  # the resolver cache
        r = c.put(f"/api/2.0/serving-endpoints/{name}/config",
                  json={"served_entities": [{"external_model": model}]})
        assert r.status_code == 200, r.text
        wait_for(lambda: c.get(f"/api/2.0/serving-endpoints/{name}").json()["state"]
                 ["config_update"] == "NOT_UPDATING", timeout_s=30, what="update done")
        assert _chat(c, name).status_code == 200
        assert _bearer(upstream) == f"Bearer {new}"
        c.delete(f"/api/2.0/serving-endpoints/{name}")
    ws.secrets.delete_scope(scope)
