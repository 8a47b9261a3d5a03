"""Creating, changing and deleting serving endpoints, and rolling configs out.

The store holds each user endpoint's definition; this manager makes the live
registry match it. A config change rolls out as a *pending config*: its workers
start while the current config keeps serving; when every new served entity is
ready, traffic switches over and the old workers are drained and stopped
(``state.config_update`` IN_PROGRESS → NOT_UPDATING). If any new entity fails to
load, the update ends UPDATE_FAILED with the loader's message on that entity and
the current config keeps serving.

Several server processes may share one database: :meth:`EndpointManager.sync`
(run at start and every ``sync_interval_s``) deploys endpoints that other
processes created or changed and removes the ones they deleted, and refreshes the
in-memory copy of the secrets that credential references resolve from.

Permissions (``gateway/policy.py``): viewing needs ``CAN_VIEW``, every change
``CAN_MANAGE``; the creator of an endpoint is granted ``CAN_MANAGE``; a config that
references ``{{secrets/scope/key}}`` may only be stored by a principal with ``READ`` on
that scope.

Every store call runs in a worker thread (``asyncio.to_thread``), never on the event
loop; the manager's lock keeps the store and the live registry in step: creates,
updates, deletes, tag/gateway/rate-limit changes and syncs run one at a time, as
they did when each store call blocked the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fmserve.config import ServerConfig, tables_base
from fmserve.errors import InvalidParameterValue, PermissionDenied, ResourceAlreadyExists
from fmserve.gateway.directory import Principal
from fmserve.gateway.identity import Identity
from fmserve.gateway.inference_tables import check_config as check_inference_table
from fmserve.gateway.policy import CAN_MANAGE, CAN_VIEW, GatewayPolicy, secret_permission
from fmserve.protocol.management import (
    AiGatewayInput,
    CreateServingEndpoint,
    EndpointCoreConfigInput,
    PatchTags,
    PutRateLimits,
)
from fmserve.protocol.validation import parse_model
from fmserve.providers import ProviderContext
from fmserve.serving.catalog import resolve
from fmserve.serving.endpoints import (
    EndpointRegistry,
    PendingConfig,
    ServedEntity,
    ServingEndpoint,
    build_entity,
    build_external_entity,
    served_entity_id,
)
from fmserve.store.db import now_ms
from fmserve.store.endpoints import EndpointRecord, EndpointStore
from fmserve.store.principals import GROUP, SERVICE_PRINCIPAL, USER
from fmserve.store.secrets import SECRET_REF, SecretStore, seal_plaintext
from fmserve.store.usage import UsageStore

log = logging.getLogger("fmserve.manager")

DRAIN_TIMEOUT_S = 60.0


def _plan(cfg: ServerConfig, name: str, config: EndpointCoreConfigInput,
          ctx: ProviderContext) -> tuple[str, list[ServedEntity], list[tuple[str, int]]]:
    """Task, (unstarted) served entities and routes of a config.

    Raises:
        InvalidParameterValue: 400 for unknown models, mixed tasks, bad routes or an
            external-model config its provider rejects.
    """
    entities_in = config.served_entities or []
    tasks = set()
    for e in entities_in:
        tasks.add(e.external_model.task if e.external_model else resolve(e.entity_name).task)
    if len(tasks) > 1:
        raise InvalidParameterValue(
            f"All served entities of an endpoint must share one task; got {sorted(tasks)}.")
    try:
        routes = config.routes()
    except ValueError as exc:
        raise InvalidParameterValue(str(exc)) from None
    entities = [build_external_entity(e, ctx) if e.external_model
                else build_entity(name, e, resolve(e.entity_name), cfg) for e in entities_in]
    return tasks.pop(), entities, routes


def _has_external(config: dict[str, Any]) -> bool:
    return any(e.get("external_model") for e in config.get("served_entities") or [])


def _config_dict(config: EndpointCoreConfigInput) -> dict[str, Any]:
    return config.model_dump(exclude_none=True, exclude={"name", "served_models"})


class EndpointManager:
    def __init__(self, cfg: ServerConfig, store: EndpointStore,
                 registry: EndpointRegistry, secrets: SecretStore,
                 providers: ProviderContext, policy: GatewayPolicy,
                 identity: Identity, usage: UsageStore, workspace_id: str) -> None:
        self.cfg = cfg
        self.usage = usage
        self.workspace_id = workspace_id
        self.policy = policy
        self.identity = identity
        self.secrets = secrets
        self.providers = providers
        self.store = store
        self.registry = registry
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.tables_base = tables_base(cfg.data_dir, cfg.tables_url)
        self._tables: Any = None  # store.delta_tables.DeltaTables, made on first use

    # -- API operations --------------------------------------------------------
    # -- reading -------------------------------------------------------------------
    def visible(self, who: Principal) -> list[dict[str, Any]]:
        """``GET /api/2.0/serving-endpoints``: the endpoints the caller may view, each with
        the caller's ``permission_level``."""
        out = []
        for ep in self.registry.all():
            level = self.policy.level(who, ep)
            if level is not None:
                out.append(ep.as_dict(level))
        return out

    def view(self, who: Principal, name: str) -> ServingEndpoint:
        """The endpoint, for a caller with ``CAN_VIEW``.

        Raises:
            ResourceDoesNotExist: 404; PermissionDenied: 403.
        """
        ep = self.registry.get(name)
        self.policy.require(who, ep, CAN_VIEW)
        return ep

    def describe(self, who: Principal, name: str) -> dict[str, Any]:
        """``GET …/{name}`` with the caller's ``permission_level``."""
        ep = self.view(who, name)
        return ep.as_dict(self.policy.level(who, ep))

    # -- API operations --------------------------------------------------------
    async def create(self, body: dict[str, Any], who: Principal) -> dict[str, Any]:
        """``POST /api/2.0/serving-endpoints``; returns the endpoint (IN_PROGRESS). The
        creator is granted ``CAN_MANAGE``.

        Raises:
            InvalidParameterValue: 400 for an invalid body or config.
            PermissionDenied: 403 for a secret reference to a scope the caller cannot READ.
            ResourceAlreadyExists: 409 when the name is taken.
        """
        if isinstance(body, dict) and isinstance(body.get("config"), dict):
            # *_plaintext credentials are encrypted before anything stores them.
            body = {**body, "config": seal_plaintext(body["config"], self.secrets)}
        req = parse_model(CreateServingEndpoint, body)
        self._check_limit_principals([*((req.ai_gateway.rate_limits or [])
                                        if req.ai_gateway else []), *(req.rate_limits or [])])
        await self._check_guardrails(req.ai_gateway)
        existing = self.registry.find(req.name)
        if existing is not None:
            raise ResourceAlreadyExists(f"Endpoint with name '{req.name}' already exists.")
        self._check_secret_refs(who, _config_dict(req.config))
        await self._fresh_secrets(_config_dict(req.config))
        task, entities, routes = _plan(self.cfg, req.name, req.config, self.providers)
        gateway = await self._gateway_config(req.name, req.ai_gateway, None)
        async with self._lock:
            rec = await asyncio.to_thread(
                self.store.create, name=req.name, creator=who.name, task=task,
                config=_config_dict(req.config),
                description=req.description or "",
                tags=[t.model_dump(exclude_none=True) for t in req.tags or []],
                ai_gateway=gateway,
                rate_limits=[r.model_dump(exclude_none=True) for r in req.rate_limits]
                if req.rate_limits else None)
            await self.identity.write(self.identity.permissions.set_grants, rec.id,
                                      {who.id: CAN_MANAGE}, replace=False)
            ep = self._endpoint(rec)
            self.registry.add(ep)
            await self._record_entities(rec, entities)
            self._rollout(ep, PendingConfig(rec.config_version, entities, routes))
        return ep.as_dict(CAN_MANAGE)

    async def update_config(self, who: Principal, name: str,
                            body: dict[str, Any]) -> dict[str, Any]:
        """``PUT …/{name}/config``: a new config version rolls out; the old one serves until then.

        Raises:
            ResourceDoesNotExist: 404; PermissionDenied: 403 (no CAN_MANAGE, or a secret
            reference the caller cannot READ); InvalidParameterValue: 400 (also for a task
            change or while another update is in progress).
        """
        ep = self._managed(who, name)
        config = parse_model(EndpointCoreConfigInput, seal_plaintext(body, self.secrets))
        self._check_secret_refs(who, _config_dict(config))
        if (ep.endpoint_type == "EXTERNAL_MODEL") != _has_external(_config_dict(config)):
            # Spec §2.4: external models cannot be added to or removed from an endpoint
            # by an update.
            raise InvalidParameterValue(
                f"Endpoint '{name}': an update cannot add external models to an endpoint "
                f"that serves local models, or remove them from one that serves them.")
        await self._fresh_secrets(_config_dict(config))
        task, entities, routes = _plan(self.cfg, name, config, self.providers)
        if task != ep.task:
            raise InvalidParameterValue(
                f"Endpoint '{name}' serves {ep.task}; an update cannot change it to {task}.")
        async with self._lock:
            # A failed pending config (UPDATE_FAILED; its workers already stopped) is
            # replaced by the new one; only a rollout still in progress blocks.
            if ep.pending is not None and ep.config_update != "UPDATE_FAILED":
                raise InvalidParameterValue(
                    f"Endpoint '{name}' is already being updated (config version "
                    f"{ep.pending.version}); wait for it to finish.", error_code="INVALID_STATE")
            rec = await asyncio.to_thread(self.store.update, name, config=_config_dict(config))
            ep.updated_ms = rec.last_updated_timestamp
            await self._record_entities(rec, entities)
            self._rollout(ep, PendingConfig(rec.config_version, entities, routes))
        return ep.as_dict(self.policy.level(who, ep))

    async def delete(self, who: Principal, name: str) -> None:
        """``DELETE …/{name}``. Raises ResourceDoesNotExist (404), InvalidParameterValue
        (400) for a built-in endpoint, PermissionDenied (403) without CAN_MANAGE."""
        ep = self._managed(who, name)
        async with self._lock:
            await asyncio.to_thread(self.store.delete, name)
            self.registry.remove(name)
            await self.identity.write(self.identity.permissions.drop_endpoint, ep.id)
            await asyncio.to_thread(self.usage.mark_deleted, name, now_ms())
        await self._teardown(ep)

    async def patch_tags(self, who: Principal, name: str,
                         body: dict[str, Any]) -> list[dict[str, Any]]:
        """``PATCH …/{name}/tags``: the endpoint's tags after the change."""
        ep = self._managed(who, name)
        req = parse_model(PatchTags, body)
        async with self._lock:  # read-modify-write: concurrent patches all land
            tags = {t["key"]: t for t in ep.tags}
            for key in req.delete_tags or []:
                tags.pop(key, None)
            for tag in req.add_tags or []:
                tags[tag.key] = tag.model_dump(exclude_none=True)
            await self._save(ep, tags=list(tags.values()))
        return ep.tags

    async def put_ai_gateway(self, who: Principal, name: str,
                             body: dict[str, Any]) -> dict[str, Any]:
        """``PUT …/{name}/ai-gateway``: the stored AI Gateway config."""
        ep = self._managed(who, name)
        parsed = parse_model(AiGatewayInput, body)
        self._check_limit_principals(parsed.rate_limits or [])
        await self._check_guardrails(parsed)
        gw = await self._gateway_config(name, parsed, ep.ai_gateway)
        assert gw is not None
        async with self._lock:
            await self._save(ep, ai_gateway=gw)
        return gw

    async def put_rate_limits(self, who: Principal, name: str,
                              body: dict[str, Any]) -> list[dict[str, Any]]:
        """``PUT …/{name}/rate-limits``: the stored rate limits."""
        ep = self._managed(who, name)
        limits = [r.model_dump(exclude_none=True)
                  for r in parse_model(PutRateLimits, body).rate_limits]
        async with self._lock:
            await self._save(ep, rate_limits=limits)
        return limits

    async def _save(self, ep: ServingEndpoint, **fields: Any) -> None:
        """Stores changed endpoint fields (tags, ai_gateway, rate_limits) and applies them
        (call holding ``_lock``)."""
        rec = await asyncio.to_thread(self.store.update, ep.name, **fields)
        ep.updated_ms = rec.last_updated_timestamp
        for key, value in fields.items():
            setattr(ep, key, value)

    async def _gateway_config(self, name: str, parsed: AiGatewayInput | None,
                              old: dict[str, Any] | None) -> dict[str, Any] | None:
        """The AI Gateway config to store: the inference table's defaults filled in and its
        location proven writable (``gateway/inference_tables.py``; a 400 otherwise)."""
        if parsed is None:
            return None
        gw = parsed.model_dump(exclude_none=True)
        if "inference_table_config" in gw:
            gw["inference_table_config"] = await asyncio.to_thread(
                check_inference_table, name, gw["inference_table_config"],
                (old or {}).get("inference_table_config"), self._delta_tables())
        return gw

    def _delta_tables(self) -> Any:
        if self._tables is None:
            from fmserve.store.delta_tables import DeltaTables

            self._tables = DeltaTables(self.tables_base)
        return self._tables

    async def _fresh_secrets(self, config: dict[str, Any]) -> None:
        """Before an external-model config is planned: reload the secrets its references
        resolve from (one written a moment ago by the CLI or another process counts)."""
        if _has_external(config):
            await asyncio.to_thread(self.secrets.refresh)

    async def _record_entities(self, rec: EndpointRecord, entities: list[ServedEntity]) -> None:
        """A ``served_entities`` row per entity of a new config version (governance §2)."""
        rows = []
        for e in entities:
            ext = e.input.external_model if e.input else None
            rows.append({
                "served_entity_id": served_entity_id(rec.id, rec.config_version, e.name),
                "workspace_id": self.workspace_id, "created_by": rec.creator,
                "endpoint_name": rec.name, "endpoint_id": rec.id, "served_entity_name": e.name,
                "entity_type": "EXTERNAL_MODEL" if ext else "FOUNDATION_MODEL",
                "entity_name": e.entity_name or None, "entity_version": e.entity_version,
                "endpoint_config_version": rec.config_version, "task": rec.task,
                "external_model_config": {"provider": ext.provider, "name": ext.name,
                                          "task": ext.task} if ext else None,
                "foundation_model_config": None if ext else {
                    "entity_name": e.entity_name, "entity_version": e.entity_version},
                "change_time": rec.last_updated_timestamp, "endpoint_delete_time": None})
        await asyncio.to_thread(self.usage.record_entities, rows)

    def _managed(self, who: Principal, name: str) -> ServingEndpoint:
        """A user endpoint the caller may change.

        Raises:
            ResourceDoesNotExist: 404; InvalidParameterValue: 400 for a built-in
            pay-per-token endpoint; PermissionDenied: 403 without ``CAN_MANAGE``.
        """
        ep = self.registry.get(name)
        if not ep.user_created:
            raise InvalidParameterValue(
                f"Endpoint '{name}' is a built-in pay-per-token endpoint and cannot be changed.")
        self.policy.require(who, ep, CAN_MANAGE)
        return ep

    async def _check_guardrails(self, gateway: AiGatewayInput | None) -> None:
        """Raises InvalidParameterValue (400) for guardrails this server cannot enforce
        (``valid_topics`` without an embeddings endpoint, ``safety`` without a safety
        endpoint); loads the PII detector when a config uses it."""
        if gateway is not None and gateway.guardrails is not None:
            await self.policy.guardrails.check_config(
                gateway.guardrails.model_dump(exclude_none=True))

    def _check_limit_principals(self, limits: list[Any]) -> None:
        """Raises InvalidParameterValue (400) for a rate limit whose ``principal`` names no
        user, service principal or group."""
        kinds = {"user": USER, "service_principal": SERVICE_PRINCIPAL, "user_group": GROUP}
        for i, lim in enumerate(limits):
            if lim.principal is None:
                continue
            kind = kinds[lim.key or "user"]
            if self.identity.directory.find(kind, lim.principal) is None:
                what = {USER: "user", SERVICE_PRINCIPAL: "service principal (application id)",
                        GROUP: "group"}[kind]
                raise InvalidParameterValue(
                    f"rate_limits[{i}].principal: no {what} named '{lim.principal}'.")

    def _check_secret_refs(self, who: Principal, config: dict[str, Any]) -> None:
        """Raises PermissionDenied (403) when the config references a secret in a scope the
        caller has no ``READ`` on (governance §4: secret ACLs)."""
        import orjson

        for scope in sorted({m.group(1) for m in SECRET_REF.finditer(
                orjson.dumps(config).decode())}):
            if secret_permission(self.identity.directory, who, scope) is None:
                raise PermissionDenied(
                    f"Principal '{who.name}' has no READ permission on secret scope "
                    f"'{scope}', which this endpoint config references. Ask a MANAGE holder "
                    f"of the scope: databricks secrets put-acl {scope} {who.name} READ.")

    # -- rollout -------------------------------------------------------------------
    def _endpoint(self, rec: EndpointRecord) -> ServingEndpoint:
        return ServingEndpoint(
            name=rec.name, task=rec.task, entities=[], routes=[], description=rec.description,
            creator=rec.creator, created_ms=rec.creation_timestamp,
            updated_ms=rec.last_updated_timestamp,
            config_version=0, endpoint_id=rec.id, tags=list(rec.tags), ai_gateway=rec.ai_gateway,
            rate_limits=rec.rate_limits, user_created=True,
            endpoint_type="EXTERNAL_MODEL" if _has_external(rec.config)
            else "FOUNDATION_MODEL_API")

    def _rollout(self, ep: ServingEndpoint, pending: PendingConfig) -> None:
        ep.pending = pending
        ep.config_update = "IN_PROGRESS"
        task = asyncio.create_task(self._roll(ep, pending), name=f"rollout-{ep.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _roll(self, ep: ServingEndpoint, pending: PendingConfig) -> None:
        workers = [e.worker for e in pending.entities if e.worker]
        await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        if ep.pending is not pending:  # deleted or superseded meanwhile
            await asyncio.gather(*(w.stop() for w in workers))
            return
        failed = [w for w in workers if w.state != "ready"]
        if failed:
            ep.config_update = "UPDATE_FAILED"
            log.error("endpoint %s config %d failed: %s", ep.name, pending.version,
                      "; ".join(f"{w.name}: {w.state_message}" for w in failed))
            await asyncio.gather(*(w.stop() for w in workers if w.state == "ready"))
            return
        old = ep.entities
        ep.entities, ep.routes, ep.config_version = pending.entities, pending.routes, \
            pending.version
        ep.pending = None
        ep.config_update = "NOT_UPDATING"
        log.info("endpoint %s now serves config version %d", ep.name, pending.version)
        await self._drain([e.worker for e in old if e.worker])

    async def _drain(self, workers: list[Any]) -> None:
        deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
        while any(w.outstanding for w in workers) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)

    async def _teardown(self, ep: ServingEndpoint) -> None:
        ep.pending = None
        await asyncio.gather(*(w.stop() for w in ep.workers()), return_exceptions=True)

    # -- keeping in step with the store ---------------------------------------------
    async def sync(self) -> None:
        """Deploy stored endpoints not live here; drop live ones no longer stored; reload
        the secrets (store reads in a thread)."""
        async with self._lock:
            records = {r.name: r for r in await asyncio.to_thread(self._load)}
            for name, rec in records.items():
                ep = self.registry.find(name)
                if ep is None:
                    ep = self._endpoint(rec)
                    self.registry.add(ep)
                elif not ep.user_created:
                    continue
                ep.tags, ep.ai_gateway, ep.rate_limits = list(rec.tags), rec.ai_gateway, \
                    rec.rate_limits
                ep.description = rec.description
                if rec.config_version > ep.target_version:
                    try:
                        config = EndpointCoreConfigInput.model_validate(rec.config)
                        _, entities, routes = _plan(self.cfg, name, config, self.providers)
                    except (InvalidParameterValue, ValueError) as exc:
                        log.error("stored endpoint %s cannot be deployed: %s", name, exc)
                        ep.config_update = "UPDATE_FAILED"
                        continue
                    ep.updated_ms = rec.last_updated_timestamp
                    self._rollout(ep, PendingConfig(rec.config_version, entities, routes))
            gone = [ep for ep in self.registry.all()
                    if ep.user_created and ep.name not in records]
            for ep in gone:
                self.registry.remove(ep.name)
        for ep in gone:
            await self._teardown(ep)

    def _load(self) -> list[EndpointRecord]:
        """Blocking: the stored endpoints, after the secrets copy is reloaded."""
        self.secrets.refresh()
        return self.store.all()

    async def run_sync_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception:  # a database hiccup must not end the loop
                log.exception("endpoint sync failed")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
