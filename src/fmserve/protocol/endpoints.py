"""Endpoint-management objects, shaped as databricks-sdk ``service/serving.py`` (spec §2.4).

Serialized with ``model_dump(exclude_none=True)`` so absent fields are absent on
the wire, as in the SDK's ``as_dict``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class FoundationModel(BaseModel):
    name: str
    display_name: str | None = None
    description: str | None = None
    docs: str | None = None


class ServedEntityState(BaseModel):
    deployment: Literal[
        "DEPLOYMENT_CREATING",
        "DEPLOYMENT_READY",
        "DEPLOYMENT_FAILED",
        "DEPLOYMENT_ABORTED",
        "DEPLOYMENT_RECOVERING",
    ]
    deployment_state_message: str | None = None


class ServedEntityOutput(BaseModel):
    model_config = ConfigDict(extra="allow")  # echoes the input's other fields

    name: str
    entity_name: str | None = None
    entity_version: str | None = None
    foundation_model: FoundationModel | None = None
    creation_timestamp: int | None = None
    creator: str | None = None
    workload_size: str | None = None
    workload_type: str | None = None
    scale_to_zero_enabled: bool | None = None
    min_provisioned_throughput: int | None = None
    max_provisioned_throughput: int | None = None
    state: ServedEntityState | None = None


class Route(BaseModel):
    served_model_name: str | None = None
    served_entity_name: str | None = None
    traffic_percentage: int


class TrafficConfig(BaseModel):
    routes: list[Route]


class EndpointCoreConfigOutput(BaseModel):
    config_version: int | None = None
    served_entities: list[ServedEntityOutput] = []
    traffic_config: TrafficConfig | None = None


class EndpointPendingConfig(BaseModel):
    start_time: int | None = None  # ms
    config_version: int | None = None
    served_entities: list[ServedEntityOutput] = []
    traffic_config: TrafficConfig | None = None


class EndpointState(BaseModel):
    ready: Literal["READY", "NOT_READY"]
    config_update: Literal["NOT_UPDATING", "IN_PROGRESS", "UPDATE_FAILED", "UPDATE_CANCELED"]


class EndpointTag(BaseModel):
    key: str
    value: str | None = None


class ServingEndpointDetailed(BaseModel):
    """``GET /api/2.0/serving-endpoints/{name}``. Timestamps are Unix time in ms."""

    name: str
    id: str
    creator: str | None = None
    creation_timestamp: int | None = None
    last_updated_timestamp: int | None = None
    description: str | None = None
    state: EndpointState
    config: EndpointCoreConfigOutput | None = None
    pending_config: EndpointPendingConfig | None = None
    task: str | None = None
    tags: list[EndpointTag] = []
    permission_level: Literal["CAN_MANAGE", "CAN_QUERY", "CAN_VIEW"] | None = None
    route_optimized: bool | None = None
    endpoint_type: str | None = None
    ai_gateway: dict[str, Any] | None = None
    rate_limits: list[dict[str, Any]] | None = None
