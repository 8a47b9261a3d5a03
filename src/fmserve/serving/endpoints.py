"""Serving endpoints and their served entities; the bundled pay-per-token endpoints.

A :class:`ServingEndpoint` has a task (``llm/v1/chat``, ``llm/v1/embeddings`` …),
served entities (each backed by a :class:`~fmserve.backends.Backend`) and a
traffic config. :class:`EndpointRegistry` holds the live endpoints by name.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmserve.backends import Backend
from fmserve.config import ServerConfig
from fmserve.engines import bundled
from fmserve.engines.local import EmbeddingBackend, LlamaBackend
from fmserve.engines.supervisor import WorkerProcess
from fmserve.errors import ResourceDoesNotExist
from fmserve.protocol.endpoints import (
    EndpointCoreConfigOutput,
    EndpointState,
    FoundationModel,
    Route,
    ServedEntityOutput,
    ServedEntityState,
    ServingEndpointDetailed,
    TrafficConfig,
)

TASK_CHAT = "llm/v1/chat"
TASK_COMPLETIONS = "llm/v1/completions"
TASK_EMBEDDINGS = "llm/v1/embeddings"


@dataclass
class ServedEntity:
    name: str
    entity_name: str
    entity_version: str
    backend: Backend
    foundation_model: FoundationModel | None = None
    worker: WorkerProcess | None = None

    def output(self, created_ms: int, creator: str) -> ServedEntityOutput:
        if self.backend.ready():
            state = ServedEntityState(deployment="DEPLOYMENT_READY",
                                      deployment_state_message="")
        elif self.worker is not None and self.worker.state == "failed":
            state = ServedEntityState(deployment="DEPLOYMENT_FAILED",
                                      deployment_state_message=self.worker.state_message)
        else:
            msg = self.worker.state_message if self.worker else ""
            state = ServedEntityState(deployment="DEPLOYMENT_RECOVERING",
                                      deployment_state_message=msg)
        return ServedEntityOutput(name=self.name, entity_name=self.entity_name,
                                  entity_version=self.entity_version,
                                  foundation_model=self.foundation_model,
                                  creation_timestamp=created_ms, creator=creator, state=state)


@dataclass
class ServingEndpoint:
    name: str
    task: str
    entities: list[ServedEntity]
    routes: list[tuple[str, int]]  # (served entity name, traffic percentage)
    description: str = ""
    creator: str = "system"
    endpoint_type: str = "FOUNDATION_MODEL_API"
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    config_version: int = 1

    @property
    def id(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:32]

    def ready(self) -> bool:
        return any(e.backend.ready() for e in self.entities)

    def pick(self, rng: random.Random) -> ServedEntity:
        """A served entity chosen at random, weighted by ``traffic_percentage``."""
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

    def detailed(self) -> ServingEndpointDetailed:
        return ServingEndpointDetailed(
            name=self.name, id=self.id, creator=self.creator,
            creation_timestamp=self.created_ms, last_updated_timestamp=self.created_ms,
            description=self.description,
            state=EndpointState(ready="READY" if self.ready() else "NOT_READY",
                                config_update="NOT_UPDATING"),
            config=EndpointCoreConfigOutput(
                config_version=self.config_version,
                served_entities=[e.output(self.created_ms, self.creator) for e in self.entities],
                traffic_config=TrafficConfig(routes=[
                    Route(served_model_name=n, served_entity_name=n, traffic_percentage=p)
                    for n, p in self.routes]),
            ),
            task=self.task, tags=[], permission_level="CAN_QUERY", route_optimized=False,
            endpoint_type=self.endpoint_type,
        )

    def as_dict(self) -> dict[str, Any]:
        return self.detailed().model_dump(exclude_none=True)


class EndpointRegistry:
    """Live serving endpoints by name."""

    def __init__(self) -> None:
        self._by_name: dict[str, ServingEndpoint] = {}

    def add(self, endpoint: ServingEndpoint) -> None:
        self._by_name[endpoint.name] = endpoint

    def get(self, name: str) -> ServingEndpoint:
        """Raises ResourceDoesNotExist (404) for an unknown name."""
        ep = self._by_name.get(name)
        if ep is None:
            raise ResourceDoesNotExist(f"Endpoint with name '{name}' does not exist.")
        return ep

    def all(self) -> list[ServingEndpoint]:
        return sorted(self._by_name.values(), key=lambda e: e.name)

    def workers(self) -> list[WorkerProcess]:
        return [e.worker for ep in self._by_name.values() for e in ep.entities if e.worker]


SMOLLM2_ENDPOINT = "databricks-smollm2-135m-instruct"
MINILM_ENDPOINT = "databricks-all-minilm-l6-v2"


def bundled_endpoints(cfg: ServerConfig) -> list[ServingEndpoint]:
    """The pay-per-token endpoints served from the weights packages (DESIGN.md)."""
    logs = Path(cfg.data_dir) / "logs"
    llama_worker = WorkerProcess(
        SMOLLM2_ENDPOINT,
        {"engine": "llama_cpp", "model_path": str(bundled.smollm2_gguf()),
         "n_ctx": cfg.n_ctx, "n_threads": cfg.llama_threads or None},
        logs / f"{SMOLLM2_ENDPOINT}.log", max_queue=cfg.max_queue)
    embed_worker = WorkerProcess(
        MINILM_ENDPOINT,
        {"engine": "sentence_transformers", "model_path": str(bundled.minilm_folder()),
         "n_threads": cfg.embed_threads or None},
        logs / f"{MINILM_ENDPOINT}.log", max_queue=cfg.max_queue)
    chat = ServingEndpoint(
        name=SMOLLM2_ENDPOINT, task=TASK_CHAT,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, llama.cpp). Chat and completions.",
        entities=[ServedEntity(
            name=SMOLLM2_ENDPOINT, entity_name="system.ai.smollm2-135m-instruct",
            entity_version="1", backend=LlamaBackend(SMOLLM2_ENDPOINT, llama_worker),
            worker=llama_worker,
            foundation_model=FoundationModel(
                name="smollm2-135m-instruct", display_name="SmolLM2 135M Instruct",
                description="Hugging Face SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF on llama.cpp.",
                docs="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"))],
        routes=[(SMOLLM2_ENDPOINT, 100)])
    embed = ServingEndpoint(
        name=MINILM_ENDPOINT, task=TASK_EMBEDDINGS,
        description="all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), "
                    "384 dimensions.",
        entities=[ServedEntity(
            name=MINILM_ENDPOINT, entity_name="system.ai.all-minilm-l6-v2", entity_version="1",
            backend=EmbeddingBackend(MINILM_ENDPOINT, embed_worker), worker=embed_worker,
            foundation_model=FoundationModel(
                name="all-minilm-l6-v2", display_name="all-MiniLM-L6-v2",
                description="sentence-transformers/all-MiniLM-L6-v2, 384-dim embeddings.",
                docs="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"))],
        routes=[(MINILM_ENDPOINT, 100)])
    return [chat, embed]


def describe_embeddings(endpoint: ServingEndpoint) -> None:
    """Once the worker reported, say in the description whether vectors are normalized."""
    info = endpoint.entities[0].backend.describe()
    if "normalized" in info:
        norm = ("normalized to unit length (cosine similarity = dot product)"
                if info["normalized"] else "not normalized")
        endpoint.description = (f"all-MiniLM-L6-v2 sentence embeddings (sentence-transformers), "
                                f"{info.get('dimensions')} dimensions, vectors {norm}; inputs "
                                f"truncated at {info.get('max_seq_length')} tokens.")
