"""Gateway-overhead benchmark: fmserve vs LiteLLM's proxy vs MLflow's AI Gateway.

Run by hand (not a test), on an otherwise idle machine::

    .venv/bin/python bench/bench_gateway.py [--duration 10] [--conns 32]
                                            [--gateways fmserve,litellm,mlflow]

Every gateway sits in front of the same fake OpenAI-compatible upstream on loopback
(``bench/fake_upstream.py``: a raw asyncio/httptools server answering a fixed chat
completion, or 8 SSE deltas with ``"stream": true``) and is loaded, one after the other in
the same run, by ``wrk`` (Debian package ``wrk``; install it with ``apt-get install wrk``).
LiteLLM (``litellm[proxy]``, 1 worker) and MLflow's gateway (``mlflow[gateway]``,
``mlflow gateway start``, its default 2 workers) are installed from PyPI into their own venvs
under ``.bench/`` the first time (``--no-install`` refuses to). fmserve is
``fmserve serve --no-bundled`` (one process, no local-model workers) with an endpoint serving
an ``openai`` external model whose ``openai_api_base`` is the upstream.

Cases, each ``--duration`` seconds after a short warm-up, non-streaming unless said:

* ``req/s @N``: wrk with ``--conns`` connections;
* ``p50``/``p99 @1``: latency at one connection, and the same minus the upstream's own
  (measured by loading the upstream directly: the "direct" row);
* ``stream req/s @N`` and ``stream p50 @1``: ``"stream": true``, time to the last byte;
* ``openai SDK p50 @1``: the same one-connection latency seen by the real ``openai``
  Python client (``chat.completions.create`` in a loop): what an application sees, with
  the client's own headers and parsing; "SDK added p50" subtracts the direct row's;
* ``CPU ms/req``: utime+stime of the gateway's whole process tree (``/proc``) during the
  ``req/s @N`` case, divided by the requests served in it;
* ``RSS MB``: resident memory summed over the process tree after all cases (forked workers
  share pages, so a multi-process tree counts them more than once — as ``ps`` would).

Prints a rich table, then fmserve's targets with pass/fail: req/s @N >= MLflow's in the
same run, twice; added p50 <= 0.3 ms (wrk and the openai SDK); server process RSS
<= 150 MB.

Then the cost of OAuth: fmserve is loaded with the first admin's PAT and with an OAuth
access token of a service principal in ``admins`` (minted by ``/oidc/v1/token``, so the
permission checks are the same), alternating, ``--auth-rounds`` times each: median added
p50 @1 and req/s @N per credential. Target: no measurable difference (within 0.05 ms p50
and 5 % req/s). ``--auth-compare`` runs only this comparison (and the direct p50).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
sys.path.insert(0, str(ROOT / "src"))
from fmserve.testing import LocalServer, free_port, start_server, stop_server  # noqa: E402

console = Console(width=max(180, shutil.get_terminal_size().columns))
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello."}]
TARGET_ADDED_P50_MS = 0.3
TARGET_RPS_VS_MLFLOW = 2.0
TARGET_RSS_MB = 150.0
TARGET_AUTH_P50_MS = 0.05  # OAuth vs PAT
TARGET_AUTH_RPS = 0.05
VENVS = {"litellm": ("litellm-venv", ["litellm[proxy]"], "litellm"),
         "mlflow": ("mlflow-venv", ["mlflow[gateway]"], "mlflow")}

# wrk prints this line from done(); latencies in microseconds.
_WRK_LUA = """
wrk.method = "POST"
wrk.body = %s
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,'
    .. '"p50_us":%%d,"p99_us":%%d,"mean_us":%%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def _lua_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------- process accounting

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_s(pids: list[int]) -> float:
    """utime + stime of ``pids`` (seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # fields 14, 15 of stat: utime, stime
    return total / tick


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


# ---------------------------------------------------------------- gateways

@dataclass
class Gateway:
    """A running gateway: where to POST, with what headers, and how to stop it."""

    name: str
    workers: str
    url: str
    headers: dict[str, str]
    body: Callable[[bool], dict[str, Any]]
    pid: int
    stop: Callable[[], None]
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _chat_body(model: str) -> Callable[[bool], dict[str, Any]]:
    return lambda stream: {"model": model, "messages": MESSAGES, "max_tokens": 32,
                           **({"stream": True} if stream else {})}


def _venv(kind: str, install: bool) -> Path:
    """The venv's bin dir, created and filled from PyPI if missing."""
    dirname, reqs, exe = VENVS[kind]
    venv = BENCH_DIR / dirname
    bindir = venv / "bin"
    if (bindir / exe).exists():
        return bindir
    if not install:
        raise SystemExit(f"{venv} is missing (run without --no-install to create it)")
    console.print(f"Creating {venv} (pip install {' '.join(reqs)}; takes a few minutes) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(bindir / "pip"), "install", "-q", *reqs], check=True)
    return bindir


def _pkg_version(bindir: Path, pkg: str) -> str:
    out = subprocess.run([str(bindir / "python"), "-c",
                          f"import importlib.metadata as m; print(m.version({pkg!r}))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def _env() -> dict[str, str]:
    """The environment for the other gateways: no proxies, nothing of fmserve's venv."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "pythonpath",
                                "pythonhome", "virtual_env")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def _stopper(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    return stop


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, probe: Callable[[], bool],
                what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if probe():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def create_endpoint(srv: LocalServer, name: str, upstream: str,
                    ai_gateway: dict[str, Any] | None = None) -> dict[str, Any]:
    """An endpoint serving an ``openai`` external model at ``upstream`` (with this
    ``ai_gateway``, if any), once READY; returns its JSON.

    Raises:
        RuntimeError: the server refused it, or it was not READY within 30 s.
    """
    external = {"provider": "openai", "name": MODEL, "task": "llm/v1/chat",
                "openai_config": {"openai_api_key_plaintext": "sk-bench",
                                  "openai_api_base": upstream + "/v1"}}
    spec: dict[str, Any] = {"name": name,
                            "config": {"served_entities": [{"external_model": external}]}}
    if ai_gateway is not None:
        spec["ai_gateway"] = ai_gateway
    with srv.client() as c:
        r = c.post("/api/2.0/serving-endpoints", json=spec)
        if r.status_code != 200:
            raise RuntimeError(f"creating the endpoint: HTTP {r.status_code} {r.text}")
        deadline = time.monotonic() + 30
        while True:
            ep: dict[str, Any] = c.get(f"/api/2.0/serving-endpoints/{name}").json()
            if ep["state"]["ready"] == "READY":
                return ep
            if time.monotonic() > deadline:
                raise RuntimeError(f"endpoint not READY: {ep['state']}\n{srv.log()[-3000:]}")
            time.sleep(0.2)


def terminate(srv: LocalServer) -> None:
    """SIGTERM (SIGINT is ignored when the benchmark runs in the background), then
    :func:`stop_server` after 15 s."""
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        stop_server(srv)


def start_fmserve(tmp: Path, upstream: str, install: bool) -> Gateway:
    srv = start_server(tmp / "fmserve", serve_args=("--no-bundled",))
    name = "bench-openai"
    try:
        create_endpoint(srv, name, upstream)
        oauth = _oauth_headers(srv.url, srv.headers)
    except Exception:
        stop_server(srv)
        raise

    from fmserve import __version__
    return Gateway("fmserve", "1", srv.url + "/serving-endpoints/chat/completions",
                   srv.headers, _chat_body(name), srv.proc.pid, lambda: terminate(srv),
                   __version__, extra={"oauth_headers": oauth})


def _oauth_headers(url: str, admin: dict[str, str]) -> dict[str, str]:
    """``Authorization`` with an OAuth access token of a new service principal in
    ``admins`` (like the PAT's owner, so only authentication differs)."""
    scim = "/api/2.0/preview/scim/v2"
    with httpx.Client(base_url=url, headers=admin, timeout=30) as c:
        admins = c.get(f"{scim}/Groups", params={"filter": 'displayName eq "admins"'})
        admins_id = admins.json()["Resources"][0]["id"]
        r = c.post(f"{scim}/ServicePrincipals", json={"displayName": "bench-oauth",
                                                      "groups": [{"value": admins_id}]})
        if r.status_code != 201:
            raise RuntimeError(f"creating the service principal: HTTP {r.status_code} {r.text}")
        sp = r.json()
        r = c.post(f"/api/2.0/accounts/servicePrincipals/{sp['id']}/credentials/secrets",
                   json={})
        if r.status_code != 200:
            raise RuntimeError(f"creating its secret: HTTP {r.status_code} {r.text}")
        secret = r.json()["secret"]
    r = httpx.post(f"{url}/oidc/v1/token", data={"grant_type": "client_credentials"},
                   auth=(sp["applicationId"], secret), timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"/oidc/v1/token: HTTP {r.status_code} {r.text}")
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def litellm_model(upstream: str, **params: Any) -> dict[str, Any]:
    """A ``model_list`` entry: ``MODEL`` at the upstream, with extra ``litellm_params``."""
    return {"model_name": MODEL, "litellm_params": {
        "model": f"openai/{MODEL}", "api_base": upstream + "/v1", "api_key": "sk-bench",
        **params}}


def spawn_litellm(tmp: Path, bindir: Path, config: dict[str, Any], name: str = "litellm",
                  env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``litellm --config`` (1 worker) with ``config`` written to ``tmp/<name>.yaml``, once
    ``/health/liveliness`` answers; returns the process and its base URL.

    Raises:
        RuntimeError: it exited or was not ready in 180 s (with its log); it is stopped.
    """
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = _env()
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
               LITELLM_TELEMETRY="False", **(env_extra or {}))
    log = tmp / f"{name}.log"
    proc = _spawn([str(bindir / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                   "--port", str(port), "--num_workers", "1"], log, env, tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, log, lambda: httpx.get(url + "/health/liveliness",
                                                 timeout=2).status_code == 200, name)
    except Exception:
        _stopper(proc)()
        raise
    return proc, url


def start_litellm(tmp: Path, upstream: str, install: bool) -> Gateway:
    bindir = _venv("litellm", install)
    key = "sk-litellm-bench"
    proc, url = spawn_litellm(tmp, bindir, {
        "model_list": [litellm_model(upstream)],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        "general_settings": {"master_key": key}})
    return Gateway("LiteLLM proxy", "1", url + "/v1/chat/completions",
                   {"Authorization": f"Bearer {key}"}, _chat_body(MODEL), proc.pid,
                   _stopper(proc), _pkg_version(bindir, "litellm"))


def start_mlflow(tmp: Path, upstream: str, install: bool) -> Gateway:
    bindir = _venv("mlflow", install)
    port = free_port()
    cfg = tmp / "mlflow-gateway.yaml"
    cfg.write_text(json.dumps({"endpoints": [{
        "name": "chat", "endpoint_type": "llm/v1/chat",
        "model": {"provider": "openai", "name": MODEL,
                  "config": {"openai_api_key": "sk-bench",
                             "openai_api_base": upstream + "/v1"}}}]}))
    log = tmp / "mlflow.log"
    proc = _spawn([str(bindir / "mlflow"), "gateway", "start", "--config-path", str(cfg),
                   "--host", "127.0.0.1", "--port", str(port)], log, _env(), tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, log, lambda: httpx.get(url + "/health", timeout=2).status_code == 200,
                    "mlflow gateway")
        time.sleep(2)  # let every worker finish starting
    except Exception:
        _stopper(proc)()
        raise
    return Gateway("MLflow AI Gateway", str(max(1, len(tree(proc.pid)) - 2)),
                   url + "/v1/chat/completions", {}, _chat_body("chat"), proc.pid,
                   _stopper(proc), _pkg_version(bindir, "mlflow"))


STARTERS = {"fmserve": start_fmserve, "litellm": start_litellm, "mlflow": start_mlflow}


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``bench/fake_upstream.py`` on a free port, once it answers; its process and URL.

    Raises:
        RuntimeError: it exited or did not answer within 30 s (it is stopped).
    """
    port = free_port()
    log = tmp / "upstream.log"
    proc = _spawn([sys.executable, str(ROOT / "bench" / "fake_upstream.py"),
                   "--port", str(port)], log, _env(), tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, log, lambda: httpx.get(url + "/v1/models", timeout=2).status_code == 200,
                    "fake upstream", 30)
    except Exception:
        _stopper(proc)()
        raise
    return proc, url


# ---------------------------------------------------------------- load

def check(gw: Gateway) -> None:
    """One plain and one streaming request must answer the upstream's text."""
    with httpx.Client(timeout=30, headers=gw.headers) as c:
        r = c.post(gw.url, json=gw.body(False))
        if r.status_code != 200 or "How can I help" not in r.text:
            raise RuntimeError(f"{gw.name}: HTTP {r.status_code}: {r.text[:500]}")
        r = c.post(gw.url, json=gw.body(True))
        if r.status_code != 200 or "today?" not in r.text or "data:" not in r.text:
            raise RuntimeError(f"{gw.name} stream: HTTP {r.status_code}: {r.text[:500]}")


def wrk(url: str, headers: dict[str, str], body: dict[str, Any], conns: int,
        duration_s: float, tmp: Path) -> dict[str, Any]:
    hdrs = {"Content-Type": "application/json", **headers}
    script = tmp / f"wrk-{abs(hash(json.dumps(body, sort_keys=True)))}-{len(headers)}.lua"
    script.write_text(_WRK_LUA % (_lua_str(json.dumps(body)), "\n".join(
        f"wrk.headers[{_lua_str(k)}] = {_lua_str(v)}" for k, v in hdrs.items())))
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    res: dict[str, Any] = json.loads(line[8:])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


@dataclass
class Row:
    name: str
    version: str
    workers: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    stream_rps: float = 0.0
    stream_p50_ms: float = 0.0
    cpu_ms: float | None = None
    rss_mb: float | None = None
    errors: int = 0
    sdk_p50_ms: float = 0.0
    sdk_p99_ms: float = 0.0


def sdk_latency(url: str, headers: dict[str, str], body: dict[str, Any],
                duration_s: float) -> tuple[float, float]:
    """p50/p99 (ms) of sequential ``chat.completions.create`` calls of the real ``openai``
    client (one keep-alive connection, its own headers, JSON parsing and response
    objects): the latency a Python client sees, where wrk sees only the wire."""
    import statistics

    from openai import OpenAI

    token = headers.get("Authorization", "Bearer none").split(" ", 1)[1]
    client = OpenAI(base_url=url.removesuffix("/chat/completions"), api_key=token,
                    max_retries=0, timeout=10)
    kw = {k: v for k, v in body.items() if k != "stream"}
    for _ in range(50):
        client.chat.completions.create(**kw)
    took: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        t = time.perf_counter()
        client.chat.completions.create(**kw)
        took.append((time.perf_counter() - t) * 1000)
    client.close()
    q = statistics.quantiles(took, n=100)
    return statistics.median(took), q[98]


def measure(name: str, version: str, workers: str, url: str, headers: dict[str, str],
            body: Callable[[bool], dict[str, Any]], pid: int | None, args: argparse.Namespace,
            tmp: Path) -> Row:
    row = Row(name, version, workers)
    console.print(f"[bold]{name}[/bold] {version}: warm-up ...")
    wrk(url, headers, body(False), args.conns, 2, tmp)
    wrk(url, headers, body(True), args.conns, 1, tmp)
    pids = tree(pid) if pid else []
    before = cpu_s(pids)
    r = wrk(url, headers, body(False), args.conns, args.duration, tmp)
    if pids:
        row.cpu_ms = (cpu_s(pids) - before) * 1000 / max(1, r["requests"])
    row.rps = r["rps"]
    lat = wrk(url, headers, body(False), 1, args.duration, tmp)
    row.p50_ms, row.p99_ms = lat["p50_us"] / 1000, lat["p99_us"] / 1000
    s = wrk(url, headers, body(True), args.conns, args.duration, tmp)
    row.stream_rps = s["rps"]
    s1 = wrk(url, headers, body(True), 1, args.duration, tmp)
    row.stream_p50_ms = s1["p50_us"] / 1000
    row.sdk_p50_ms, row.sdk_p99_ms = sdk_latency(url, headers, body(False), args.duration)
    row.errors = sum(x["status_errors"] + x["socket_errors"] for x in (r, lat, s, s1))
    if pid:
        row.rss_mb = rss_mb(tree(pid))
    console.print(f"  {row.rps:,.0f} req/s @{args.conns}, p50 {row.p50_ms:.2f} ms @1, "
                  f"stream {row.stream_rps:,.0f} req/s, errors {row.errors}")
    return row


@dataclass
class AuthRow:
    """One case of alternating rounds: req/s @N and p50 @1 (ms) per round, errors and
    requests answered."""

    credential: str
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    errors: int = 0
    requests: int = 0  # answered, all rounds


def alternate(cases: list[tuple[AuthRow, str, dict[str, str], dict[str, Any]]], rounds: int,
              conns: int, duration_s: float, tmp: Path) -> None:
    """``rounds`` rounds of every case (row, url, headers, body), the order reversed every
    other round (so drift hits all alike): wrk @``conns`` for req/s, then @1 for p50,
    appended to each case's row."""
    for i in range(rounds):
        for row, url, headers, body in cases if i % 2 == 0 else cases[::-1]:
            r = wrk(url, headers, body, conns, duration_s, tmp)
            lat = wrk(url, headers, body, 1, duration_s, tmp)
            row.rps.append(r["rps"])
            row.p50_ms.append(lat["p50_us"] / 1000)
            row.errors += sum(x["status_errors"] + x["socket_errors"] for x in (r, lat))
            row.requests += r["requests"] + lat["requests"]


def measure_auth(gw: Gateway, args: argparse.Namespace, tmp: Path) -> list[AuthRow]:
    """PAT and OAuth token, alternating (so drift hits both alike), ``--auth-rounds``
    times: req/s @N and p50 @1 with each."""
    creds = [("PAT", gw.headers), ("OAuth token", gw.extra["oauth_headers"])]
    rows = [AuthRow(name) for name, _ in creds]
    for _, headers in creds:  # both must work; warm both caches
        check(Gateway(**{**gw.__dict__, "headers": headers}))
        wrk(gw.url, headers, gw.body(False), args.conns, 2, tmp)
    console.print(f"[bold]fmserve auth[/bold]: PAT vs OAuth token, {args.auth_rounds} rounds ...")
    cases = [(row, gw.url, headers, gw.body(False))
             for row, (_, headers) in zip(rows, creds, strict=True)]
    alternate(cases, args.auth_rounds, args.conns, args.duration, tmp)
    return rows


def report_auth(rows: list[AuthRow], direct_p50_ms: float, args: argparse.Namespace) -> None:
    import statistics

    t = Table(title=f"fmserve: PAT vs OAuth access token — median of {args.auth_rounds} "
                    f"alternating rounds, {args.duration:.0f} s per case")
    for col in ("credential", f"req/s @{args.conns}", "p50 @1 (ms)", "added p50 (ms)",
                "rounds req/s", "rounds p50", "errors"):
        t.add_column(col, justify="left" if col == "credential" else "right")
    med = {}
    for r in rows:
        rps, p50 = statistics.median(r.rps), statistics.median(r.p50_ms)
        med[r.credential] = (rps, p50)
        t.add_row(r.credential, f"{rps:,.0f}", f"{p50:.3f}", f"{p50 - direct_p50_ms:+.3f}",
                  " ".join(f"{x:,.0f}" for x in r.rps), " ".join(f"{x:.3f}" for x in r.p50_ms),
                  str(r.errors))
    console.print(t)
    (pat_rps, pat_p50), (oa_rps, oa_p50) = med["PAT"], med["OAuth token"]
    dp50, drps = oa_p50 - pat_p50, (oa_rps - pat_rps) / pat_rps

    def verdict(ok: bool) -> str:
        return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

    console.print(f"  OAuth vs PAT added p50 @1 within {TARGET_AUTH_P50_MS} ms: {dp50:+.3f} ms  "
                  f"{verdict(abs(dp50) <= TARGET_AUTH_P50_MS)}")
    console.print(f"  OAuth vs PAT req/s @{args.conns} within {TARGET_AUTH_RPS:.0%}: "
                  f"{drps:+.1%}  {verdict(abs(drps) <= TARGET_AUTH_RPS)}")
    if any(r.errors for r in rows):
        console.print("  [red]fmserve answered requests with errors[/red]")


def report(rows: list[Row], args: argparse.Namespace) -> None:
    base = rows[0]
    t = Table(title=f"Gateway overhead — same upstream, wrk, {args.duration:.0f} s per case, "
                    f"{os.cpu_count()} CPUs")
    for col in ("gateway", "version", "workers", f"req/s @{args.conns}", "p50 @1 (ms)",
                "added p50", "p99 @1 (ms)", "added p99", f"stream req/s @{args.conns}",
                "stream p50 @1 (ms)", "added stream p50", "openai SDK p50 @1",
                "SDK added p50", "CPU ms/req", "RSS MB", "errors"):
        t.add_column(col, justify="left" if col in ("gateway", "version") else "right")
    for r in rows:
        direct = r is base
        t.add_row(r.name, r.version, r.workers, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}",
                  "" if direct else f"{r.p50_ms - base.p50_ms:+.2f}", f"{r.p99_ms:.2f}",
                  "" if direct else f"{r.p99_ms - base.p99_ms:+.2f}", f"{r.stream_rps:,.0f}",
                  f"{r.stream_p50_ms:.2f}",
                  "" if direct else f"{r.stream_p50_ms - base.stream_p50_ms:+.2f}",
                  f"{r.sdk_p50_ms:.2f}",
                  "" if direct else f"{r.sdk_p50_ms - base.sdk_p50_ms:+.2f}",
                  "" if r.cpu_ms is None else f"{r.cpu_ms:.2f}",
                  "" if r.rss_mb is None else f"{r.rss_mb:.0f}", str(r.errors))
    console.print(t)
    fm = next((r for r in rows if r.name == "fmserve"), None)
    ml = next((r for r in rows if r.name.startswith("MLflow")), None)
    if fm is None:
        return
    console.print("[bold]fmserve targets[/bold] (one server process, no local-model workers):")

    def verdict(ok: bool) -> str:
        return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"

    if ml is not None:
        console.print(f"  req/s @{args.conns} >= {TARGET_RPS_VS_MLFLOW:g} x MLflow's "
                      f"({ml.workers} workers, {ml.rps:,.0f}): {fm.rps:,.0f} "
                      f"({fm.rps / ml.rps:.1f} x)  "
                      f"{verdict(fm.rps >= TARGET_RPS_VS_MLFLOW * ml.rps)}")
    added = fm.p50_ms - base.p50_ms
    console.print(f"  added p50 @1 <= {TARGET_ADDED_P50_MS} ms: {added:.2f} ms  "
                  f"{verdict(added <= TARGET_ADDED_P50_MS)}")
    sdk_added = fm.sdk_p50_ms - base.sdk_p50_ms
    console.print(f"  added p50 @1 seen by the openai SDK <= {TARGET_ADDED_P50_MS} ms: "
                  f"{sdk_added:.2f} ms  {verdict(sdk_added <= TARGET_ADDED_P50_MS)}")
    if fm.rss_mb is not None:
        console.print(f"  server RSS <= {TARGET_RSS_MB:.0f} MB: {fm.rss_mb:.0f} MB  "
                      f"{verdict(fm.rss_mb <= TARGET_RSS_MB)}")
    if fm.errors:
        console.print(f"  [red]fmserve answered {fm.errors} requests with errors[/red]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per case")
    ap.add_argument("--conns", type=int, default=32, help="connections for the req/s cases")
    ap.add_argument("--gateways", default="fmserve,litellm,mlflow",
                    help="comma-separated subset of fmserve,litellm,mlflow")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of creating the LiteLLM/MLflow venvs under .bench/")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs")
    ap.add_argument("--auth-rounds", type=int, default=5,
                    help="alternating PAT/OAuth rounds in the auth comparison")
    ap.add_argument("--auth-compare", action="store_true",
                    help="only fmserve with a PAT vs an OAuth token (and the direct p50)")
    args = ap.parse_args()
    if args.auth_compare:
        args.gateways = "fmserve"
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    names = [n.strip() for n in args.gateways.split(",") if n.strip()]
    unknown = set(names) - set(STARTERS)
    if unknown:
        raise SystemExit(f"unknown gateways {sorted(unknown)}; choose from {sorted(STARTERS)}")
    for n in names:  # install up front so the measured run is not interleaved with pip
        if n in VENVS:
            _venv(n, not args.no_install)

    tmp = Path(tempfile.mkdtemp(prefix="fmserve-bench-gw-"))
    rows: list[Row] = []
    auth_rows: list[AuthRow] = []
    direct_p50 = 0.0
    upstream_proc, upstream = start_upstream(tmp)
    try:
        direct = (upstream + "/v1/chat/completions", {"Authorization": "Bearer sk-bench"})
        if args.auth_compare:
            wrk(*direct, _chat_body(MODEL)(False), 1, 2, tmp)
            direct_p50 = wrk(*direct, _chat_body(MODEL)(False), 1, args.duration,
                             tmp)["p50_us"] / 1000
        else:
            rows.append(measure("direct (upstream)", "", "1", *direct, _chat_body(MODEL),
                                None, args, tmp))
            direct_p50 = rows[0].p50_ms
        for n in names:
            gw = STARTERS[n](tmp, upstream, not args.no_install)
            try:
                check(gw)
                if not args.auth_compare:
                    rows.append(measure(gw.name, gw.version, gw.workers, gw.url, gw.headers,
                                        gw.body, gw.pid, args, tmp))
                if "oauth_headers" in gw.extra:
                    auth_rows = measure_auth(gw, args, tmp)
            finally:
                gw.stop()
    finally:
        _stopper(upstream_proc)()
        if args.keep_logs:
            console.print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        report(rows, args)
    if auth_rows:
        report_auth(auth_rows, direct_p50, args)


if __name__ == "__main__":
    main()
