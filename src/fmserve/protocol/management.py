"""Endpoint-management request bodies (spec §2.3–§2.4, databricks-sdk ``service/serving.py``).

Inputs are lenient about fields the SDK and mlflow serialize but fmserve does not
act on (``config.name``, ``budget_policy_id``, ``email_notifications`` …): they
are accepted and kept. Validation that needs the model registry (known
``entity_name``, one task per endpoint) lives in ``serving/manager.py``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
MAX_SERVED_ENTITIES = 15  # databricks-sdk-py#1496: the real limit


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ExternalProvider(NamedTuple):
    """One ``external_model.provider`` (spec §2.4 ``ExternalModel``).

    Attributes:
        config: the ``<provider>_config`` field holding its settings.
        module: the ``fmserve.providers`` module that serves it; None where fmserve
            accepts the name but serves no such provider (a 400 when an entity uses it).
        api: the API spoken.
    """

    config: str
    module: str | None
    api: str


# The one list of external-model providers ("google", the Gemini API with an API key, is
# an fmserve extension); ``fmserve.providers.build_backend`` picks the module from it.
EXTERNAL_PROVIDERS: dict[str, ExternalProvider] = {
    "openai": ExternalProvider("openai_config", "openai_compat",
                               "OpenAI / Azure OpenAI (api key, Entra ID)"),
    "anthropic": ExternalProvider("anthropic_config", "anthropic", "Anthropic Messages API"),
    "cohere": ExternalProvider("cohere_config", "cohere", "Cohere v2 chat / embed"),
    "amazon-bedrock": ExternalProvider("amazon_bedrock_config", "bedrock",
                                       "Bedrock Converse / InvokeModel (SigV4)"),
    "google-cloud-vertex-ai": ExternalProvider("google_cloud_vertex_ai_config", "google",
                                               "Vertex AI Gemini (service-account OAuth)"),
    "google": ExternalProvider("google_config", "google", "Gemini API (API key)"),
    "databricks-model-serving": ExternalProvider(
        "databricks_model_serving_config", "openai_compat",
        "another Databricks / fmserve workspace"),
    "custom": ExternalProvider("custom_provider_config", "openai_compat",
                               "any OpenAI-compatible server"),
    "ai21labs": ExternalProvider("ai21labs_config", None, "AI21 Labs"),
    "palm": ExternalProvider("palm_config", None, "Google PaLM"),
}
EXTERNAL_TASKS = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")


class ExternalModelInput(_Lenient):
    """``external_model`` of a served entity (spec §2.4 ``ExternalModel``).

    Exactly one ``<provider>_config`` (see :data:`EXTERNAL_PROVIDERS`) must be given;
    provider-specific required fields are checked by ``fmserve.providers``.
    """

    provider: str
    name: str = Field(min_length=1)
    task: str

    @field_validator("provider")
    @classmethod
    def _provider(cls, v: str) -> str:
        if v not in EXTERNAL_PROVIDERS:
            raise ValueError(f"unknown external model provider '{v}'; one of "
                             f"{sorted(EXTERNAL_PROVIDERS)}")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v not in EXTERNAL_TASKS:
            raise ValueError(f"external model task must be one of {list(EXTERNAL_TASKS)}, "
                             f"got '{v}'")
        return v

    @model_validator(mode="after")
    def _one_config(self) -> ExternalModelInput:
        extra = self.model_extra or {}
        given = [p.config for p in EXTERNAL_PROVIDERS.values()
                 if extra.get(p.config) is not None]
        want = EXTERNAL_PROVIDERS[self.provider].config
        if given != [want]:
            raise ValueError(f"provider '{self.provider}' takes exactly one config, "
                             f"'{want}'; got {given or 'none'}")
        if not isinstance(extra[want], dict):
            raise ValueError(f"'{want}' must be an object")
        return self

    def provider_config(self) -> dict[str, Any]:
        """The ``<provider>_config`` object."""
        return dict((self.model_extra or {})[EXTERNAL_PROVIDERS[self.provider].config])


class ServedEntityInput(_Lenient):
    """One served entity: a local model (``entity_name``) or an external model
    (``external_model``), never both."""

    name: str | None = None
    entity_name: str | None = None
    entity_version: str | None = None
    external_model: ExternalModelInput | None = None
    workload_size: str | None = None
    workload_type: str | None = None
    scale_to_zero_enabled: bool | None = None
    min_provisioned_throughput: int | None = Field(default=None, ge=0)
    max_provisioned_throughput: int | None = Field(default=None, ge=0)
    min_provisioned_concurrency: int | None = Field(default=None, ge=0)
    max_provisioned_concurrency: int | None = Field(default=None, ge=0)
    provisioned_model_units: int | None = Field(default=None, ge=0)
    environment_vars: dict[str, str] | None = None

    @model_validator(mode="after")
    def _external_exclusive(self) -> ServedEntityInput:
        if self.external_model is not None:
            local = [f for f in ("entity_name", "entity_version", "workload_size",
                                 "workload_type", "scale_to_zero_enabled",
                                 "min_provisioned_throughput", "max_provisioned_throughput",
                                 "provisioned_model_units")
                     if getattr(self, f) not in (None, False)]
            if local:
                raise ValueError(f"external_model cannot be combined with {local}")
        elif not self.entity_name:
            raise ValueError("a served entity needs entity_name or external_model")
        return self

    def served_name(self) -> str:
        """The entity's name; default ``<entity_name>-<entity_version>`` as the SDK documents."""
        if self.name:
            return self.name
        if self.external_model:
            return self.external_model.name.replace(".", "-").replace(":", "-")
        base = (self.entity_name or "entity").replace(".", "-").replace("/", "-")
        return f"{base}-{self.entity_version}" if self.entity_version else base


class RouteInput(_Lenient):
    served_model_name: str | None = None
    served_entity_name: str | None = None
    traffic_percentage: int = Field(ge=0, le=100)

    def target(self) -> str:
        name = self.served_entity_name or self.served_model_name
        if not name:
            raise ValueError("a route needs served_entity_name or served_model_name")
        return name


class TrafficConfigInput(_Lenient):
    routes: list[RouteInput] = []


class EndpointCoreConfigInput(_Lenient):
    """``config`` of create and the body of ``PUT …/{name}/config``."""

    name: str | None = None  # serialized by the SDK inside config; ignored (spec §2.4)
    served_entities: list[ServedEntityInput] | None = None
    served_models: list[dict[str, Any]] | None = None  # deprecated form
    traffic_config: TrafficConfigInput | None = None
    auto_capture_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _entities(self) -> EndpointCoreConfigInput:
        if self.served_entities is None and self.served_models:
            # Legacy served_models: {name, model_name, model_version, workload_size, ...}
            self.served_entities = [
                ServedEntityInput.model_validate({
                    **{k: v for k, v in m.items() if k not in ("model_name", "model_version")},
                    "entity_name": m.get("model_name"), "entity_version": m.get("model_version"),
                }) for m in self.served_models]
        entities = self.served_entities or []
        if not entities:
            raise ValueError("config.served_entities must name at least one served entity")
        if len(entities) > MAX_SERVED_ENTITIES:
            raise ValueError(f"at most {MAX_SERVED_ENTITIES} served entities are allowed per "
                             f"endpoint, got {len(entities)}")
        names = [e.served_name() for e in entities]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"served entity names must be unique; repeated: {sorted(dup)}")
        return self

    def routes(self) -> list[tuple[str, int]]:
        """``(served entity name, percentage)``; default: all traffic to a single entity.

        Raises:
            ValueError: routes naming unknown entities, or percentages not summing to 100.
        """
        names = [e.served_name() for e in self.served_entities or []]
        if self.traffic_config is None or not self.traffic_config.routes:
            if len(names) == 1:
                return [(names[0], 100)]
            raise ValueError("traffic_config.routes is required when there are several "
                             "served entities")
        routes = [(r.target(), r.traffic_percentage) for r in self.traffic_config.routes]
        unknown = [n for n, _ in routes if n not in names]
        if unknown:
            raise ValueError(f"traffic_config.routes name unknown served entities {unknown}; "
                             f"served entities are {names}")
        total = sum(p for _, p in routes)
        if total != 100:
            raise ValueError(f"traffic_config.routes traffic_percentage must sum to 100, "
                             f"got {total}")
        return routes


class EndpointTagInput(BaseModel):
    key: str = Field(min_length=1, max_length=255)
    value: str | None = None


class RateLimitInput(BaseModel):
    """``AiGatewayRateLimit`` (governance §1.2): ``calls`` and/or ``tokens`` (≥ 1) per
    ``renewal_period`` ``minute`` for a ``key``; ``principal`` names the user (email),
    service principal (application id) or group of a custom limit — never with ``key:
    endpoint``; required for ``user_group`` and ``service_principal``."""

    model_config = ConfigDict(extra="forbid")
    calls: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    renewal_period: Literal["minute"] = "minute"
    key: Literal["endpoint", "user", "user_group", "service_principal"] | None = None
    principal: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _combination(self) -> RateLimitInput:
        if self.calls is None and self.tokens is None:
            raise ValueError("a rate limit needs 'calls' or 'tokens' (or both)")
        if self.principal is not None and (self.key or "endpoint") == "endpoint":
            raise ValueError("'principal' cannot be set on a rate limit with key 'endpoint'")
        if self.principal is None and self.key in ("user_group", "service_principal"):
            raise ValueError(f"a rate limit with key '{self.key}' needs 'principal'")
        return self


MAX_RATE_LIMITS = 20  # Databricks: at most 20 rate limits per endpoint, 5 of them for groups
MAX_GROUP_RATE_LIMITS = 5


def _check_limit_counts(limits: list[RateLimitInput] | None) -> list[RateLimitInput] | None:
    if limits is not None:
        if len(limits) > MAX_RATE_LIMITS:
            raise ValueError(f"at most {MAX_RATE_LIMITS} rate limits per endpoint")
        if sum(1 for lim in limits if lim.key == "user_group") > MAX_GROUP_RATE_LIMITS:
            raise ValueError(f"at most {MAX_GROUP_RATE_LIMITS} group rate limits per endpoint")
    return limits


class UsageTrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None


IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
TABLE_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,254}$")


class InferenceTableConfig(BaseModel):
    """``inference_table_config`` (governance §1.2, §3): the table is
    ``<catalog_name>.<schema_name>.<table_name_prefix>_payload``. Catalog and schema are
    identifiers (letters, digits, ``_``; not starting with a digit); the prefix may also
    hold ``-`` (it defaults to the endpoint name, filled in by ``serving/manager.py``)."""

    model_config = ConfigDict(extra="forbid")
    catalog_name: str | None = None
    schema_name: str | None = None
    table_name_prefix: str | None = None
    enabled: bool | None = None

    @field_validator("catalog_name", "schema_name")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        if v is not None and not IDENTIFIER_RE.match(v):
            raise ValueError(f"'{v}' is not a valid identifier: letters, digits and '_', "
                             "not starting with a digit, at most 255 characters")
        return v

    @field_validator("table_name_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and not TABLE_PREFIX_RE.match(v):
            raise ValueError(f"'{v}' is not a valid table name prefix: letters, digits, '_' "
                             "and '-', at most 255 characters")
        return v

    @model_validator(mode="after")
    def _required(self) -> InferenceTableConfig:
        if self.enabled and (not self.catalog_name or not self.schema_name):
            raise ValueError("catalog_name and schema_name are required when enabling "
                             "inference tables")
        return self


_Keyword = Annotated[StrictStr, StringConstraints(strip_whitespace=True, min_length=1,
                                                  max_length=256)]
_Topic = Annotated[StrictStr, StringConstraints(strip_whitespace=True, min_length=1,
                                                max_length=1000)]


class PiiBehaviorInput(BaseModel):
    """``AiGatewayGuardrailPiiBehavior``: ``behavior`` ``NONE`` | ``BLOCK`` | ``MASK``."""

    model_config = ConfigDict(extra="forbid")
    behavior: Literal["NONE", "BLOCK", "MASK"] | None = None


class GuardrailParametersInput(BaseModel):
    """``AiGatewayGuardrailParameters`` (governance §1.2): what ``gateway/guardrails.py``
    enforces on one side. Keywords and topics are non-empty strings (surrounding
    whitespace dropped; at most 256 / 1000 characters, 1000 / 100 of them)."""

    model_config = ConfigDict(extra="forbid")
    safety: bool | None = None
    pii: PiiBehaviorInput | None = None
    invalid_keywords: list[_Keyword] | None = Field(default=None, max_length=1000)
    valid_topics: list[_Topic] | None = Field(default=None, max_length=100)


class GuardrailsInput(BaseModel):
    """``AiGatewayGuardrails``: ``input`` and ``output`` parameters."""

    model_config = ConfigDict(extra="forbid")
    input: GuardrailParametersInput | None = None
    output: GuardrailParametersInput | None = None


class AiGatewayInput(_Lenient):
    """``PUT …/{name}/ai-gateway`` body, stored and returned as given. Enforced:
    ``fallback_config`` (``serving/query.py``: on a 5xx the other served entities are
    tried), ``rate_limits``, ``usage_tracking_config``, ``inference_table_config``
    (``gateway/inference_tables.py``) and guardrails (``gateway/guardrails.py``)."""

    usage_tracking_config: UsageTrackingConfig | None = None
    inference_table_config: InferenceTableConfig | None = None
    rate_limits: list[RateLimitInput] | None = None
    guardrails: GuardrailsInput | None = None
    fallback_config: dict[str, Any] | None = None

    @field_validator("rate_limits")
    @classmethod
    def _counts(cls, v: list[RateLimitInput] | None) -> list[RateLimitInput] | None:
        return _check_limit_counts(v)


class CreateServingEndpoint(_Lenient):
    """``POST /api/2.0/serving-endpoints`` body."""

    name: str
    config: EndpointCoreConfigInput
    ai_gateway: AiGatewayInput | None = None
    rate_limits: list[RateLimitInput] | None = None
    tags: list[EndpointTagInput] | None = None
    description: str | None = None
    route_optimized: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("an endpoint name is 1-63 characters: letters, digits, '-' and '_', "
                             "starting with a letter or digit")
        return v


class PatchTags(_Lenient):
    add_tags: list[EndpointTagInput] | None = None
    delete_tags: list[str] | None = None


class PutRateLimits(_Lenient):
    """Legacy ``PUT …/rate-limits`` (``RateLimit``: ``calls`` required, ``key`` ``user`` or
    ``endpoint``)."""

    rate_limits: list[RateLimitInput] = []

    @field_validator("rate_limits")
    @classmethod
    def _legacy(cls, v: list[RateLimitInput]) -> list[RateLimitInput]:
        for lim in v:
            if lim.calls is None or lim.tokens is not None or lim.principal is not None or \
                    (lim.key or "endpoint") not in ("endpoint", "user"):
                raise ValueError("a legacy rate limit is {calls, renewal_period, key} with key "
                                 "'user' or 'endpoint'; use the AI Gateway for token, group "
                                 "or principal limits")
        return _check_limit_counts(v) or []
