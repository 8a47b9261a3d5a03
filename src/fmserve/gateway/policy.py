"""Gateway policy: the one object ``serving/`` calls around every backend call.

:class:`RequestContext` says who asks what (principal, endpoint, served entity, request
ids, ``usage_context``); :meth:`GatewayPolicy.admit` runs before the backend is called
and :meth:`GatewayPolicy.settle` after the answer or the stream ends — the seams where
permissions (here), rate limits, usage, inference tables and guardrails plug in.

Permission levels on serving endpoints (governance §4.6), lowest first: ``CAN_VIEW``
(get, list, metrics, logs, openapi), ``CAN_QUERY`` (also every query route),
``CAN_MANAGE`` (also config, tags, AI Gateway, rate limits, permissions, delete). A
principal's level on an endpoint is the highest of its direct grants and those of every
group it belongs to; workspace admins have ``CAN_MANAGE`` everywhere. The bundled
pay-per-token endpoints are ``CAN_QUERY`` for every authenticated principal and
changeable by none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fmserve.errors import PermissionDenied
from fmserve.gateway.directory import Directory, Principal

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


class GatewayPolicy:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory

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
    def admit(self, ctx: RequestContext, endpoint: GovernedEndpoint) -> None:
        """Before the backend call: may this request run?

        Raises:
            PermissionDenied: 403 without ``CAN_QUERY`` on the endpoint.
        """
        self.require(ctx.principal, endpoint, CAN_QUERY)

    def settle(self, ctx: RequestContext, status: int, usage: Mapping[str, Any] | None) -> None:
        """After the answer (or the stream's end, or its failure): ``status`` is the HTTP
        status the client saw, ``usage`` the answer's token counts when known."""


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
