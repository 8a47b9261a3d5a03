"""Serving endpoints and their served entities, as live objects.

A :class:`ServingEndpoint` has a task (``llm/v1/chat``, ``llm/v1/embeddings`` …),
served entities (each backed by a :class:`~fmserve.backends.Backend`, local ones
by a :class:`~fmserve.engines.pool.WorkerPool`), a traffic config, and
while a config change rolls out a pending config. :class:`EndpointRegistry`
holds the live endpoints by name.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmserve.backends import Backend
from fmserve.config import ServerConfig
from fmserve.engines.local import EmbeddingBackend, LlamaBackend
from fmserve.engines.pool import WorkerPool
from fmserve.errors import ResourceDoesNotExist, TemporarilyUnavailable
from fmserve.protocol.endpoints import (
    EndpointCoreConfigOutput,
    EndpointPendingConfig,
    EndpointState,
    EndpointTag,
    FoundationModel,
    Route,
    ServedEntityOutput,
    ServedEntityState,
    ServingEndpointDetailed,
    TrafficConfig,
)
from fmserve.protocol.management import ServedEntityInput
from fmserve.providers import ProviderContext, build_backend
from fmserve.serving.catalog import (  # noqa: F401 - re-exported task names
    TASK_CHAT,
    TASK_COMPLETIONS,
    TASK_EMBEDDINGS,
    ModelSource,
    llama_weights,
    replicas_for,
    resolve,
)
from fmserve.store.db import now_ms
from fmserve.store.secrets import redact_plaintext


def served_entity_id(endpoint_id: str, config_version: int, entity: str) -> str:
    """The 32-hex id of a served entity in one config version of an endpoint (the
    ``served_entity_id`` joining ``endpoint_usage`` and ``served_entities``)."""
    return hashlib.sha256(f"{endpoint_id}:{config_version}:{entity}".encode()).hexdigest()[:32]


@dataclass
class ServedEntity:
    name: str
    entity_name: str
    entity_version: str | None
    backend: Backend
    foundation_model: FoundationModel | None = None
    worker: WorkerPool | None = None
    input: ServedEntityInput | None = None
    created_ms: int = field(default_factory=now_ms)

    def state(self) -> ServedEntityState:
        w = self.worker
        if self.backend.ready():
            return ServedEntityState(deployment="DEPLOYMENT_READY", deployment_state_message="")
        if w is not None and w.state == "failed":
            return ServedEntityState(deployment="DEPLOYMENT_FAILED",
                                     deployment_state_message=w.state_message)
        if w is not None and w.state == "starting" and w.restarts == 0:
            return ServedEntityState(deployment="DEPLOYMENT_CREATING",
                                     deployment_state_message="Loading the model")
        msg = w.state_message if w else ""
        return ServedEntityState(deployment="DEPLOYMENT_RECOVERING", deployment_state_message=msg)

    def output(self, creator: str) -> ServedEntityOutput:
        # *_plaintext credentials (stored encrypted) are never shown.
        extra = redact_plaintext(self.input.model_dump(
            exclude_none=True, exclude={"name", "entity_name", "entity_version"})) \
            if self.input else {}
        return ServedEntityOutput(**extra, name=self.name, entity_name=self.entity_name or None,
                                  entity_version=self.entity_version,
                                  foundation_model=self.foundation_model,
                                  creation_timestamp=self.created_ms, creator=creator,
                                  state=self.state())


def build_entity(endpoint: str, inp: ServedEntityInput, source: ModelSource,
                 cfg: ServerConfig, *, bundled: bool = False) -> ServedEntity:
    """A served entity with its (not yet started) worker replicas.

    The worker is named ``<endpoint>/<entity>`` and logs to
    ``<data dir>/logs/<endpoint>/<entity>.log``; a ``bundled`` (pay-per-token) entity's
    worker is named after its endpoint (``logs/<endpoint>.log``) and the entity shows no
    served-entity input (nothing user-supplied to echo).

    Raises:
        InvalidParameterValue: 400 for provisioned-throughput or workload settings
            the model cannot take.
    """
    name = inp.served_name()
    worker_name = endpoint if bundled else f"{endpoint}/{name}"
    log_path = Path(cfg.data_dir) / "logs" / f"{worker_name}.log"
    lo, hi = replicas_for(inp.min_provisioned_throughput, inp.max_provisioned_throughput,
                          inp.workload_size, source, inp.entity_name or name)
    cores = os.cpu_count() or 1
    if source.engine == "llama_cpp":
        spec: dict[str, Any] = {"engine": "llama_cpp", "model_path": source.path,
                                "n_ctx": cfg.n_ctx, "max_seqs": cfg.llama_max_seqs,
                                "prefill_chunk": cfg.llama_prefill_chunk,
                                "weights": llama_weights(inp.environment_vars,
                                                         cfg.llama_weights, source),
                                "n_threads": cfg.llama_threads or max(1, cores // hi)}
    else:
        spec = {"engine": "sentence_transformers", "model_path": source.path,
                "n_threads": cfg.embed_threads or max(1, cores // hi)}
    worker = WorkerPool(worker_name, spec, log_path, min_replicas=lo, max_replicas=hi,
                        max_queue=cfg.max_queue, scale_to_zero=bool(inp.scale_to_zero_enabled),
                        idle_timeout_s=cfg.scale_to_zero_idle_s)
    backend: Backend = (LlamaBackend(name, worker, cfg.max_tokens_default)
                        if source.engine == "llama_cpp" else EmbeddingBackend(name, worker))
    return ServedEntity(name=name, entity_name=inp.entity_name or name,
                        entity_version=inp.entity_version, backend=backend,
                        foundation_model=source.foundation_model, worker=worker,
                        input=None if bundled else inp)


def build_external_entity(inp: ServedEntityInput, ctx: ProviderContext) -> ServedEntity:
    """A served entity fronting an external model (no worker; ready at once).

    Raises:
        InvalidParameterValue: 400 for a provider config the provider rejects.
    """
    assert inp.external_model is not None
    name = inp.served_name()
    backend = build_backend(name, inp.external_model, ctx)
    return ServedEntity(name=name, entity_name="", entity_version=None, backend=backend,
                        input=inp)


@dataclass
class PendingConfig:
    version: int
    entities: list[ServedEntity]
    routes: list[tuple[str, int]]
    start_ms: int = field(default_factory=now_ms)


def _traffic(routes: list[tuple[str, int]]) -> TrafficConfig:
    return TrafficConfig(routes=[Route(served_model_name=n, served_entity_name=n,
                                       traffic_percentage=p) for n, p in routes])


@dataclass
class ServingEndpoint:
    name: str
    task: str
    entities: list[ServedEntity]
    routes: list[tuple[str, int]]  # (served entity name, traffic percentage)
    description: str = ""
    creator: str = "system"
    endpoint_type: str = "FOUNDATION_MODEL_API"
    created_ms: int = field(default_factory=now_ms)
    updated_ms: int = 0
    config_version: int = 1
    endpoint_id: str = ""
    tags: list[dict[str, Any]] = field(default_factory=list)
    ai_gateway: dict[str, Any] | None = None
    rate_limits: list[dict[str, Any]] | None = None
    config_update: str = "NOT_UPDATING"
    pending: PendingConfig | None = None
    user_created: bool = False

    @property
    def id(self) -> str:
        return self.endpoint_id or hashlib.sha256(self.name.encode()).hexdigest()[:32]

    @property
    def target_version(self) -> int:
        """The config version deployed or being deployed."""
        return self.pending.version if self.pending else self.config_version

    def ready(self) -> bool:
        return any(e.backend.ready() for e in self.entities)

    def workers(self) -> list[WorkerPool]:
        pending = self.pending.entities if self.pending else []
        return [e.worker for e in [*self.entities, *pending] if e.worker]

    def pick(self, rng: random.Random) -> ServedEntity:
        """A served entity chosen at random, weighted by ``traffic_percentage``."""
        if not self.entities:
            raise TemporarilyUnavailable(
                f"Endpoint '{self.name}' has no served entity ready yet.", retry_after=5)
        names = [n for n, _ in self.routes]
        weights = [w for _, w in self.routes]
        if len(names) == 1 or not any(weights):
            return self.entity(names[0])
        return self.entity(rng.choices(names, weights=weights)[0])

    def entity(self, name: str) -> ServedEntity:
        for e in self.entities:
            if e.name == name:
                return e
        raise ResourceDoesNotExist(
            f"Served model '{name}' does not exist in endpoint '{self.name}'.")

    def detailed(self, permission_level: str | None = None) -> ServingEndpointDetailed:
        """The endpoint as the API shows it; ``permission_level`` is the caller's."""
        config = None
        if self.entities:
            config = EndpointCoreConfigOutput(
                config_version=self.config_version,
                served_entities=[e.output(self.creator) for e in self.entities],
                traffic_config=_traffic(self.routes))
        pending = None
        if self.pending:
            pending = EndpointPendingConfig(
                start_time=self.pending.start_ms, config_version=self.pending.version,
                served_entities=[e.output(self.creator) for e in self.pending.entities],
                traffic_config=_traffic(self.pending.routes))
        return ServingEndpointDetailed(
            name=self.name, id=self.id, creator=self.creator,
            creation_timestamp=self.created_ms,
            last_updated_timestamp=self.updated_ms or self.created_ms,
            description=self.description or None,
            state=EndpointState(ready="READY" if self.ready() else "NOT_READY",
                                config_update=self.config_update),  # type: ignore[arg-type]
            config=config, pending_config=pending, task=self.task,
            tags=[EndpointTag(**t) for t in self.tags],
            permission_level=permission_level,  # type: ignore[arg-type]
            route_optimized=False, endpoint_type=self.endpoint_type,
            ai_gateway=self.ai_gateway, rate_limits=self.rate_limits,
        )

    def as_dict(self, permission_level: str | None = None) -> dict[str, Any]:
        return self.detailed(permission_level).model_dump(exclude_none=True)


class EndpointRegistry:
    """Live serving endpoints by name."""

    def __init__(self) -> None:
        self._by_name: dict[str, ServingEndpoint] = {}

    def add(self, endpoint: ServingEndpoint) -> None:
        self._by_name[endpoint.name] = endpoint

    def remove(self, name: str) -> ServingEndpoint | None:
        return self._by_name.pop(name, None)

    def find(self, name: str) -> ServingEndpoint | None:
        return self._by_name.get(name)

    def get(self, name: str) -> ServingEndpoint:
        """Raises ResourceDoesNotExist (404) for an unknown name."""
        ep = self._by_name.get(name)
        if ep is None:
            raise ResourceDoesNotExist(f"Endpoint with name '{name}' does not exist.")
        return ep

    def all(self) -> list[ServingEndpoint]:
        return sorted(self._by_name.values(), key=lambda e: e.name)

    def workers(self) -> list[WorkerPool]:
        return [w for ep in self._by_name.values() for w in ep.workers()]


SMOLLM2_ENDPOINT = "databricks-smollm2-135m-instruct"
MINILM_ENDPOINT = "databricks-all-minilm-l6-v2"


def bundled_endpoints(cfg: ServerConfig) -> list[ServingEndpoint]:
    """The pay-per-token endpoints served from the weights packages (DESIGN.md)."""
    out = []
    for ep_name, model, task, desc in (
        (SMOLLM2_ENDPOINT, "system.ai.smollm2-135m-instruct", TASK_CHAT,
         "SmolLM2-135M-Instruct (Q4_1 GGUF, llama.cpp). Chat and completions."),
        (MINILM_ENDPOINT, "system.ai.all-minilm-l6-v2", TASK_EMBEDDINGS,
         "all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), 384 dimensions."),
    ):
        inp = ServedEntityInput(name=ep_name, entity_name=model, entity_version="1")
        entity = build_entity(ep_name, inp, resolve(model), cfg, bundled=True)
        out.append(ServingEndpoint(name=ep_name, task=task, entities=[entity],
                                   routes=[(ep_name, 100)], description=desc))
    return out


def describe_embeddings(endpoint: ServingEndpoint) -> None:
    """Once the worker reported, say in the description whether vectors are normalized."""
    info = endpoint.entities[0].backend.describe()
    if "normalized" in info:
        norm = ("normalized to unit length (cosine similarity = dot product)"
                if info["normalized"] else "not normalized")
        endpoint.description = (f"all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), "
                                f"{info.get('dimensions')} dimensions, vectors {norm}; inputs "
                                f"truncated at {info.get('max_seq_length')} tokens.")
