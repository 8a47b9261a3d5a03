"""Routes without authentication: host metadata (spec §3.5), health, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fmserve.api.deps import json_response

router = APIRouter()


@router.get("/.well-known/databricks-config")
async def databricks_config(request: Request) -> Response:
    """Host metadata read by every databricks-sdk ``Config()`` (SDK ≥ 0.99)."""
    base = str(request.base_url).rstrip("/")
    return json_response({"oidc_endpoint": f"{base}/oidc",
                          "workspace_id": request.app.state.fm.workspace_id})


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when every endpoint is ready, else 503; per-endpoint and per-worker state."""
    fm = request.app.state.fm
    eps = {ep.name: "READY" if ep.ready() else "NOT_READY" for ep in fm.registry.all()}
    workers = [{"entity": w.name, "state": w.state, "pid": w.pid, "pids": w.pids,
                "replicas": len(w.replicas), "outstanding": w.outstanding,
                "restarts": w.restarts} for w in fm.registry.workers()]
    ok = all(v == "READY" for v in eps.values())
    return json_response({"status": "ok" if ok else "degraded", "endpoints": eps,
                          "workers": workers}, 200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.fm.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)
