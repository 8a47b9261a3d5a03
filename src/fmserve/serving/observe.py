"""What an endpoint shows about itself: worker logs, its metrics, its OpenAPI document."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from fmserve.engines.pool import WorkerPool
from fmserve.errors import ResourceDoesNotExist
from fmserve.serving.catalog import TASK_CHAT, TASK_COMPLETIONS, TASK_EMBEDDINGS
from fmserve.serving.endpoints import ServingEndpoint

LOG_BYTES = 64 * 1024


def entity_worker(ep: ServingEndpoint, entity: str) -> WorkerPool:
    """The worker of served entity ``entity`` (current or pending config).

    Raises:
        ResourceDoesNotExist: 404 for an unknown entity.
    """
    pending = ep.pending.entities if ep.pending else []
    for e in [*pending, *ep.entities]:
        if e.name == entity and e.worker is not None:
            return e.worker
    raise ResourceDoesNotExist(f"Served model '{entity}' does not exist in endpoint '{ep.name}'.")


def log_tail(worker: WorkerPool, limit: int = LOG_BYTES) -> str:
    """The last ``limit`` bytes of the worker's log (its stdout and stderr)."""
    try:
        with open(worker.log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def log_head(worker: WorkerPool, limit: int = LOG_BYTES) -> str:
    """The first ``limit`` bytes of the worker's log: how the model was loaded."""
    try:
        with open(worker.log_path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def endpoint_metrics(registry: CollectorRegistry, ep: ServingEndpoint) -> bytes:
    """Prometheus text of the series that belong to ``ep`` (its name or its workers)."""
    labels = {f'endpoint="{ep.name}"'} | {f'entity="{w.name}"' for w in ep.workers()}
    out = []
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or any(lbl in line for lbl in labels):
            out.append(line)
    return ("\n".join(out) + "\n").encode()


_SCHEMAS: dict[str, dict[str, Any]] = {
    TASK_CHAT: {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {"role": {"enum": ["system", "user", "assistant", "tool"]},
                           "content": {"type": ["string", "array", "null"]}}}},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number"}, "top_k": {"type": "integer"},
        "n": {"type": "integer", "minimum": 1, "maximum": 5},
        "stop": {"type": ["string", "array"]}, "stream": {"type": "boolean"}}},
    TASK_COMPLETIONS: {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": ["string", "array"]}, "max_tokens": {"type": "integer"},
        "temperature": {"type": "number"}, "stream": {"type": "boolean"}}},
    TASK_EMBEDDINGS: {"type": "object", "required": ["input"], "properties": {
        "input": {"type": ["string", "array"]},
        "encoding_format": {"enum": ["float", "base64"]}}},
}


def openapi_doc(ep: ServingEndpoint, base_url: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document for ``POST /serving-endpoints/{name}/invocations``."""
    schema = _SCHEMAS.get(ep.task, {"type": "object"})
    paths = {f"/serving-endpoints/{ep.name}/invocations": {"post": {
        "summary": f"Query {ep.name} ({ep.task})",
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "The model's answer",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {}}}}}}}
    for e in ep.entities:
        paths[f"/serving-endpoints/{ep.name}/served-models/{e.name}/invocations"] = \
            paths[f"/serving-endpoints/{ep.name}/invocations"]
    return {"openapi": "3.1.0",
            "info": {"title": ep.name, "version": str(ep.config_version)},
            "servers": [{"url": base_url}],
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}], "paths": paths}
