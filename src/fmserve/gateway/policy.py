"""Gateway policy: the one object ``serving/`` calls around every backend call.

:class:`RequestContext` says who asks what (principal, endpoint, served entity, request
ids, ``usage_context``). Around each query ``serving/`` calls :meth:`GatewayPolicy.open`,
:meth:`~GatewayPolicy.authorize` (permissions), :meth:`~GatewayPolicy.admit` (rate
limits, once the body is parsed) and, when the answer or the stream ends or the call
fails, :meth:`~GatewayPolicy.settle` (limit reconciliation, usage records) — the seams
where inference tables and guardrails plug in too.

Permission levels on serving endpoints (governance §4.6), lowest first: ``CAN_VIEW``
(get, list, metrics, logs, openapi), ``CAN_QUERY`` (also every query route),
``CAN_MANAGE`` (also config, tags, AI Gateway, rate limits, permissions, delete). A
principal's level on an endpoint is the highest of its direct grants and those of every
group it belongs to; workspace admins have ``CAN_MANAGE`` everywhere. The bundled
pay-per-token endpoints are ``CAN_QUERY`` for every authenticated principal and
changeable by none.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fmserve.errors import PermissionDenied, RequestLimitExceeded, TemporarilyUnavailable
from fmserve.gateway.directory import Directory, Principal
from fmserve.gateway.guardrails import Guardrails
from fmserve.gateway.inference_tables import payload, table_of
from fmserve.gateway.limits import Decision, MemoryLimiter, limits_of, plan_for
from fmserve.gateway.limits_redis import LimiterUnavailable
from fmserve.gateway.usage import Demand, Outcome, usage_record
from fmserve.store.db import now_ms
from fmserve.store.request_log import RequestLog

log = logging.getLogger("fmserve.gateway")

CAN_VIEW, CAN_QUERY, CAN_MANAGE = "CAN_VIEW", "CAN_QUERY", "CAN_MANAGE"
LEVELS = (CAN_VIEW, CAN_QUERY, CAN_MANAGE)
RANK = {level: i for i, level in enumerate(LEVELS)}
LEVEL_DESCRIPTIONS = {
    CAN_MANAGE: "Can manage the serving endpoint: update its config, tags, AI Gateway and "
                "permissions, and delete it",
    CAN_QUERY: "Can query the serving endpoint and view it",
    CAN_VIEW: "Can view the serving endpoint, its metrics and logs",
}
_DOES = {CAN_VIEW: "view", CAN_QUERY: "query", CAN_MANAGE: "manage"}


class GovernedEndpoint(Protocol):
    """What the policy needs to know of a serving endpoint."""

    @property
    def name(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def user_created(self) -> bool: ...

    @property
    def ai_gateway(self) -> dict[str, Any] | None: ...

    @property
    def rate_limits(self) -> list[dict[str, Any]] | None: ...


@dataclass(frozen=True)
class RequestContext:
    """One query request, as the gateway sees it.

    ``client_request_id`` (≤ 128 chars) and ``usage_context`` (str → str) come from the
    request body (spec governance §2–3); ``request_id`` is the server's own id.
    """

    principal: Principal
    request_id: str
    endpoint: str = ""
    served_entity: str | None = None
    client_request_id: str | None = None
    usage_context: Mapping[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Admission:
    """One request between :meth:`GatewayPolicy.open` and :meth:`GatewayPolicy.settle`."""

    ctx: RequestContext
    endpoint: GovernedEndpoint
    started_ms: int
    streaming: bool
    demand: Demand | None = None
    served_entity_id: str | None = None
    reserved: Any = None  # the limiter holding a reservation, or None
    settled: bool = False
    table: str | None = None  # the inference table its payload goes to, or None
    request_body: Any = None  # the JSON body (kept for the inference table)


class GatewayPolicy:
    """Permissions, rate limits and usage tracking around every query.

    ``limiter``: a :class:`~fmserve.gateway.limits.MemoryLimiter` (one process) or a
    :class:`~fmserve.gateway.limits_redis.RedisLimiter` (replicas). ``request_log``: where
    usage records go (None: usage tracking off, e.g. in unit tests). ``guardrails``: the
    input/output guardrails ``serving/`` applies around the backend call
    (``gateway/guardrails.py``; default: without topic or safety models).
    """

    def __init__(self, directory: Directory, limiter: Any = None,
                 request_log: RequestLog | None = None, workspace_id: str = "",
                 fail_open: bool = False, guardrails: Guardrails | None = None) -> None:
        self.directory = directory
        self.guardrails = guardrails if guardrails is not None else Guardrails()
        self.limiter = limiter if limiter is not None else MemoryLimiter()
        self.request_log = request_log
        self.workspace_id = workspace_id
        self.fail_open = fail_open

    # -- permissions -----------------------------------------------------------------
    def level(self, principal: Principal, endpoint: GovernedEndpoint) -> str | None:
        """The principal's permission level on the endpoint, or None for no access."""
        if not endpoint.user_created:
            return CAN_QUERY
        if principal.is_admin:
            return CAN_MANAGE
        grants = self.directory.grants(endpoint.id)
        best: str | None = grants.get(principal.id)
        for gid in principal.group_ids:
            lvl = grants.get(gid)
            if lvl is not None and (best is None or RANK[lvl] > RANK[best]):
                best = lvl
        return best

    def allows(self, principal: Principal, endpoint: GovernedEndpoint, needed: str) -> bool:
        have = self.level(principal, endpoint)
        return have is not None and RANK[have] >= RANK[needed]

    def require(self, principal: Principal, endpoint: GovernedEndpoint, needed: str) -> None:
        """Raises: PermissionDenied (403) naming the level needed and the endpoint."""
        if not self.allows(principal, endpoint, needed):
            raise PermissionDenied(
                f"Principal '{principal.name}' does not have {needed} permission on serving "
                f"endpoint '{endpoint.name}'; it is needed to {_DOES[needed]} it. Ask a user "
                "with CAN_MANAGE on the endpoint (or a workspace admin) to grant it.")

    # -- around every backend call -----------------------------------------------------
    def open(self, ctx: RequestContext, endpoint: GovernedEndpoint,
             streaming: bool) -> Admission:
        """Start governing one request (no checks yet: failures from here on are settled
        and, with usage tracking, recorded)."""
        return Admission(replace(ctx, endpoint=endpoint.name), endpoint, now_ms(), streaming,
                         table=table_of(endpoint.ai_gateway))

    def authorize(self, adm: Admission) -> None:
        """Raises: PermissionDenied (403) without ``CAN_QUERY`` on the endpoint."""
        self.require(adm.ctx.principal, adm.endpoint, CAN_QUERY)

    async def admit(self, adm: Admission, demand: Demand) -> None:
        """Rate limits: reserve one call and ``demand.reserve_tokens`` tokens in every
        bucket the request must fit (``gateway/limits.py``).

        Raises:
            RequestLimitExceeded: 429 with a true ``Retry-After`` when a bucket is full.
            TemporarilyUnavailable: 503 when the shared counters are unreachable (unless
                ``fail_open``).
        """
        adm.demand = demand
        ep = adm.endpoint
        if not (ep.rate_limits or (ep.ai_gateway or {}).get("rate_limits")):
            return
        p = adm.ctx.principal
        plan = plan_for(limits_of(ep.ai_gateway, ep.rate_limits), ep.id, p.id, p.name, p.kind,
                        p.group_names)
        if plan.empty:
            return
        tokens = demand.reserve_tokens if plan.counts_tokens else 0
        try:
            result = self.limiter.reserve(plan, adm.ctx.request_id, tokens)
            decision = await result if inspect.isawaitable(result) else result
        except LimiterUnavailable as exc:
            if self.fail_open:
                log.warning("rate limits not enforced (fail open): %s", exc)
                return
            raise TemporarilyUnavailable(
                "Rate limits cannot be checked: the shared rate-limit store is unreachable. "
                "Retry shortly.", retry_after=2) from None
        if not decision.admitted:
            raise _throttled(ep.name, decision, tokens)
        adm.reserved = self.limiter

    async def settle(self, adm: Admission, outcome: Outcome) -> None:
        """After the answer, the stream's end or a failure: reconcile the token reservation
        to the real usage (released on failure; with Redis in the background, as an answer
        need not wait for it) and, with usage tracking on, write the
        usage record to the request log — awaited, so it is durable before the response
        completes; with an inference table, the same record carries its payload
        (``gateway/inference_tables.py``). Idempotent."""
        if adm.settled:
            return
        adm.settled = True
        if adm.reserved is not None:
            tin, tout = outcome.tokens(adm.demand)
            r = adm.reserved.settle(adm.ctx.request_id,
                                    tin + tout if outcome.status < 400 else None)
            if inspect.isawaitable(r):  # Redis: a round trip the answer need not wait
                _reconcile_later(r)     # for (a late settle only over-reserves)
        gw = adm.endpoint.ai_gateway or {}
        tracked = bool((gw.get("usage_tracking_config") or {}).get("enabled"))
        if self.request_log is not None and (tracked or adm.table):
            ctx = adm.ctx
            record = usage_record(
                request_id=ctx.request_id, client_request_id=ctx.client_request_id,
                workspace_id=self.workspace_id, requester=ctx.principal.name,
                endpoint=adm.endpoint.name, served_entity_id=adm.served_entity_id,
                request_time_ms=adm.started_ms, demand=adm.demand, outcome=outcome,
                usage_context=ctx.usage_context, streaming=adm.streaming)
            record["usage"] = tracked
            if adm.table:
                record["inference"] = payload(adm.table, adm.request_body, outcome.body,
                                              adm.started_ms)
            await self.request_log.append(record)


_RECONCILING: set[asyncio.Task[Any]] = set()


def _reconcile_later(settle: Awaitable[Any]) -> None:
    async def run() -> None:
        try:
            await settle
        except LimiterUnavailable as exc:
            log.warning("rate-limit reservation not reconciled: %s", exc)

    task = asyncio.ensure_future(run())
    _RECONCILING.add(task)
    task.add_done_callback(_RECONCILING.discard)


def _throttled(endpoint: str, d: Decision, tokens: int) -> RequestLimitExceeded:
    b = d.bucket
    assert b is not None
    per = f"{b.calls} calls" if d.dimension == "calls" else f"{b.tokens} tokens"
    if d.retry_after_s is None:
        return RequestLimitExceeded(
            f"REQUEST_LIMIT_EXCEEDED: this request reserves {tokens} tokens (prompt plus "
            f"max_tokens), more than {b.label} of {per} per minute on endpoint '{endpoint}' "
            "allows; lower max_tokens or shorten the prompt.", retry_after=60)
    return RequestLimitExceeded(
        f"REQUEST_LIMIT_EXCEEDED: {b.label} of {per} per minute on endpoint '{endpoint}' "
        f"is used up; retry in {d.retry_after_s} s.", retry_after=d.retry_after_s)


def secret_permission(directory: Directory, principal: Principal, scope: str) -> str | None:
    """The principal's permission on a secret scope (``READ`` < ``WRITE`` < ``MANAGE``),
    from entries for its name, its groups' names and ``users``; admins ``MANAGE``."""
    if principal.is_admin:
        return "MANAGE"
    acl = directory.secret_acls(scope)
    order = {"READ": 0, "WRITE": 1, "MANAGE": 2}
    best: str | None = None
    for who in (principal.name, *principal.group_names):
        perm = acl.get(who)
        if perm is not None and (best is None or order[perm] > order[best]):
            best = perm
    return best
