"""The app factory: builds all state in the lifespan and hangs it on ``app.state.fm``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from fmserve import __version__
from fmserve.api import (
    docs_routes,
    errors,
    manage_routes,
    misc_routes,
    oidc_routes,
    permission_routes,
    query_routes,
    scim_routes,
    secrets_routes,
    sp_secret_routes,
    token_routes,
)
from fmserve.config import ServerConfig, tables_base
from fmserve.gateway.auth import Authenticator
from fmserve.gateway.directory import Directory
from fmserve.gateway.guardrails import Guardrails
from fmserve.gateway.identity import Identity
from fmserve.gateway.inference_tables import TablesMaterializer
from fmserve.gateway.limits import MemoryLimiter
from fmserve.gateway.limits_redis import RedisLimiter
from fmserve.gateway.oauth import TokenSigner
from fmserve.gateway.policy import GatewayPolicy
from fmserve.gateway.usage import UsageMaterializer
from fmserve.providers import HttpClient, ProviderContext
from fmserve.serving.endpoints import (
    MINILM_ENDPOINT,
    EndpointRegistry,
    bundled_endpoints,
    describe_embeddings,
)
from fmserve.serving.guard_models import RegistryModels
from fmserve.serving.manager import EndpointManager
from fmserve.serving.metrics import ServingMetrics
from fmserve.serving.query import QueryService
from fmserve.store.credentials import CredentialStore
from fmserve.store.db import Database, open_database
from fmserve.store.endpoints import EndpointStore
from fmserve.store.permissions import PermissionStore
from fmserve.store.principals import PrincipalStore
from fmserve.store.request_log import RequestLog, replica_name
from fmserve.store.secrets import SecretStore, load_key
from fmserve.store.tokens import TokenStore
from fmserve.store.usage import UsageStore

log = logging.getLogger("fmserve")


@dataclass
class AppState:
    config: ServerConfig
    db: Database
    tokens: TokenStore
    auth: Authenticator
    identity: Identity
    policy: GatewayPolicy
    registry: EndpointRegistry
    manager: EndpointManager
    query: QueryService
    metrics: ServingMetrics
    workspace_id: str
    request_log: RequestLog
    usage: UsageStore
    secrets: SecretStore
    http: HttpClient


def _identity(cfg: ServerConfig, db: Database, secrets: SecretStore) -> Identity:
    """The identity stores, the built-in groups and first admin, the token signer and the
    loaded directory. Blocking."""
    principals = PrincipalStore(db)
    principals.ensure_builtins(cfg.admin_user)
    directory = Directory(principals)
    directory.refresh()
    credentials = CredentialStore(db)
    signer = TokenSigner.load(credentials, secrets.seal, secrets.open)
    tokens = TokenStore(db)
    return Identity(principals=principals, tokens=tokens, credentials=credentials,
                    permissions=PermissionStore(db), directory=directory, signer=signer,
                    auth=Authenticator(tokens, directory, signer))


async def _identity_sync(identity: Identity, interval_s: float) -> None:
    """Reloads the directory every ``interval_s`` (changes made by other replicas)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await identity.refresh()
        except Exception:  # a database hiccup: keep the last snapshot, retry next time
            log.exception("identity sync failed")


# The GIL switch interval (s). Background threads (the usage and Delta materialisers,
# identity refreshes) run Python too; at CPython's default 5 ms the event loop could
# wait that long for the GIL in the middle of an answer. 0.5 ms bounds that wait.
SWITCH_INTERVAL_S = 0.0005


def create_app(cfg: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        db = await asyncio.to_thread(open_database, cfg)  # store calls: never on the loop
        secrets = SecretStore(db, load_key(cfg.data_dir))
        identity = await asyncio.to_thread(_identity, cfg, db, secrets)
        workspace_id = await asyncio.to_thread(db.workspace_id)
        log_root = cfg.data_dir / "request-log"
        request_log = RequestLog(log_root, replica_name(cfg.port), cfg.request_log_sync)
        limiter = RedisLimiter(cfg.redis_url) if cfg.redis_url else MemoryLimiter()
        registry = EndpointRegistry()
        guardrails = Guardrails(RegistryModels(registry, cfg.topic_endpoint,
                                               cfg.safety_endpoint))
        policy = GatewayPolicy(identity.directory, limiter, request_log, workspace_id,
                               cfg.rate_limit_fail_open, guardrails)
        usage = UsageStore(db)
        materializer = UsageMaterializer(log_root, usage)
        await asyncio.to_thread(materializer.run_once)  # catch up on what a crash left
        tables = TablesMaterializer(log_root, usage, tables_base(cfg.data_dir, cfg.tables_url),
                                    interval_s=cfg.tables_interval_s)
        if cfg.bundled:
            for ep in bundled_endpoints(cfg):
                registry.add(ep)
        workers = registry.workers()
        http = HttpClient(cfg.external_timeout_s)
        # Secret references resolve from the store's in-memory copy (never the database
        # on the event loop); the manager's sync refreshes it.
        providers = ProviderContext(http=http, secret=secrets.resolve,
                                    allow_private_image_urls=cfg.allow_private_image_urls)
        manager = EndpointManager(cfg, EndpointStore(db), registry, secrets, providers,
                                  policy, identity, usage, workspace_id)
        app.state.fm = AppState(
            config=cfg, db=db, tokens=identity.tokens, auth=identity.auth, identity=identity,
            policy=policy, registry=registry, manager=manager,
            query=QueryService(registry, policy, default_max_tokens=cfg.max_tokens_default),
            metrics=ServingMetrics(registry.workers),
            workspace_id=workspace_id, request_log=request_log, usage=usage,
            secrets=secrets, http=http)
        await manager.sync()  # user endpoints come back, loading in the background
        await asyncio.gather(*(w.start() for w in workers))
        for w in workers:
            if w.state != "ready":
                log.error("served entity %s is not ready: %s", w.name, w.state_message)
        if cfg.bundled:
            describe_embeddings(registry.get(MINILM_ENDPOINT))
        syncers = [asyncio.create_task(manager.run_sync_loop(cfg.sync_interval_s)),
                   asyncio.create_task(_identity_sync(identity, cfg.sync_interval_s)),
                   asyncio.create_task(materializer.run()),
                   asyncio.create_task(tables.run())]  # its first pass catches up
        try:
            yield
        finally:
            for task in syncers:
                task.cancel()
            await manager.close()
            await http.close()
            if isinstance(limiter, RedisLimiter):
                await limiter.close()
            request_log.close()
            await asyncio.to_thread(materializer.run_once)
            try:
                await asyncio.to_thread(tables.run_once, False)
            except Exception:  # the storage is away: the next start catches up
                log.exception("Delta tables not brought up to date at shutdown")
            await asyncio.gather(*(w.stop() for w in registry.workers()),
                                 return_exceptions=True)
            db.close()

    # /docs and /openapi.json need credentials like every API route (api/docs_routes.py).
    app = FastAPI(title="fmserve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app)
    app.include_router(misc_routes.router)
    app.include_router(manage_routes.router)
    app.include_router(query_routes.router)
    app.include_router(secrets_routes.router)
    app.include_router(oidc_routes.router)
    app.include_router(scim_routes.router)
    app.include_router(token_routes.router)
    app.include_router(sp_secret_routes.router)
    app.include_router(permission_routes.router)
    app.include_router(docs_routes.router)
    app.add_middleware(query_routes.FastQueryPath)
    return app
