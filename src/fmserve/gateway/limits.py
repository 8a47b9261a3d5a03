"""AI Gateway rate limits: which buckets a request must fit, and the in-memory limiter.

Semantics (governance §1.3, from Databricks' rate-limits page):

* ``key: endpoint`` — a global cap: every request to the endpoint counts against it, and
  once it is full every caller is refused, whatever their own limits.
* ``key: user`` / ``service_principal`` with ``principal`` (a user name or an
  application id) — that principal's own bucket. It beats any group limit and the default.
* ``key: user_group`` with ``principal`` (a group name) — **one bucket shared by every
  member**. A principal in several limited groups is refused only when every one of
  those buckets is full; its call is charged to the first that has room.
* ``key: user`` without ``principal`` — the default: a bucket per principal (users and
  service principals alike), for principals with no custom or group limit.
* ``calls`` and ``tokens`` on one key are two dimensions of one bucket: a request must
  fit both (so the more restrictive wins). The legacy ``rate_limits`` (``PUT
  …/rate-limits``: ``key`` ``user``/``endpoint``, ``calls``) join the same list.

Window: **sliding log, 60 s** (``renewal_period: minute``). A bucket keeps each admitted
request's time and amounts; a request fits when the sum over the last 60 s plus its own
amount is within the limit, so no 60-second interval ever holds more than the limit —
exact, unlike fixed windows (up to 2× across a boundary) or token buckets. ``Retry-After``
is the time until enough entries leave the window for the request to fit, rounded up to
whole seconds: true, so clients that sleep and retry (databricks-sdk does, for up to
300 s) succeed on their next try unless others took the room first.

Tokens are reserved at admission — prompt tokens plus ``max_tokens`` — and the entry is
reconciled to the answer's real ``usage`` when it ends (:meth:`MemoryLimiter.settle`);
a request that fails has its tokens released (its call still counts).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 60.0


@dataclass(frozen=True)
class Limit:
    """One configured limit (``AiGatewayRateLimit`` / legacy ``RateLimit``)."""

    key: str  # endpoint | user | user_group | service_principal
    principal: str | None
    calls: int | None
    tokens: int | None


def limits_of(ai_gateway: Mapping[str, Any] | None,
              legacy: Iterable[Mapping[str, Any]] | None) -> list[Limit]:
    """The endpoint's limits: ``ai_gateway.rate_limits`` plus the legacy ``rate_limits``."""
    out = []
    for raw in [*((ai_gateway or {}).get("rate_limits") or []), *(legacy or [])]:
        out.append(Limit(raw.get("key") or "endpoint", raw.get("principal"),
                         raw.get("calls"), raw.get("tokens")))
    return out


@dataclass(frozen=True)
class Bucket:
    """A counter one or more requests share: ``id`` is unique across endpoints."""

    id: str
    label: str  # for messages: "the endpoint limit", "user alice@example.com", ...
    calls: int | None
    tokens: int | None


@dataclass(frozen=True)
class Plan:
    """What a request must fit: every ``required`` bucket, and one of ``any_of`` (the
    caller's group buckets) when that list is not empty."""

    required: tuple[Bucket, ...] = ()
    any_of: tuple[Bucket, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.required and not self.any_of

    @property
    def counts_tokens(self) -> bool:
        return any(b.tokens is not None for b in (*self.required, *self.any_of))


def _merge(bucket_id: str, label: str, limits: list[Limit]) -> Bucket:
    """Several limits on one key: each dimension takes its smallest value."""
    calls = [lim.calls for lim in limits if lim.calls is not None]
    tokens = [lim.tokens for lim in limits if lim.tokens is not None]
    return Bucket(bucket_id, label, min(calls) if calls else None,
                  min(tokens) if tokens else None)


def plan_for(limits: list[Limit], endpoint_id: str, principal_id: str, principal_name: str,
             principal_kind: str, group_names: Iterable[str]) -> Plan:
    """The buckets a request by this principal must fit (see the module docstring)."""
    if not limits:
        return Plan()
    base = f"{endpoint_id}:"
    required: list[Bucket] = []
    endpoint = [lim for lim in limits if lim.key == "endpoint"]
    if endpoint:
        required.append(_merge(base + "endpoint", "the endpoint limit", endpoint))
    own_key = "service_principal" if principal_kind == "service_principal" else "user"
    own = [lim for lim in limits if lim.principal is not None
           and lim.key in (own_key, "user", "service_principal")
           and lim.principal.lower() == principal_name.lower()]
    if own:
        required.append(_merge(base + "p:" + principal_id,
                               f"the limit of {principal_kind.replace('_', ' ')} "
                               f"'{principal_name}'", own))
        return Plan(tuple(required))
    groups = {g.lower() for g in group_names}
    by_group: dict[str, list[Limit]] = {}
    for lim in limits:
        if lim.key == "user_group" and lim.principal and lim.principal.lower() in groups:
            by_group.setdefault(lim.principal, []).append(lim)
    if by_group:
        any_of = tuple(_merge(base + "g:" + g.lower(), f"the shared limit of group '{g}'", ls)
                       for g, ls in sorted(by_group.items()))
        return Plan(tuple(required), any_of)
    default = [lim for lim in limits if lim.key == "user" and lim.principal is None]
    if default:
        required.append(_merge(base + "p:" + principal_id,
                               f"the per-user limit (for '{principal_name}')", default))
    return Plan(tuple(required))


@dataclass(frozen=True)
class Decision:
    """The limiter's answer: admitted, or refused by ``bucket`` for ``retry_after_s``
    (None when the request can never fit: it alone asks more than the limit)."""

    admitted: bool
    bucket: Bucket | None = None
    dimension: str = ""  # "calls" | "tokens"
    retry_after_s: int | None = None
    charged: tuple[str, ...] = ()  # bucket ids the request was charged to


@dataclass(eq=False)
class _Entry:
    t: float
    tokens: int


@dataclass
class _Log:
    entries: deque[_Entry] = field(default_factory=deque)
    tokens: int = 0

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0].t <= now - WINDOW_S:
            self.tokens -= self.entries.popleft().tokens

    def wait_s(self, bucket: Bucket, need_tokens: int, now: float) -> tuple[str, float] | None:
        """None if the request fits now; else the first dimension that does not and the
        seconds until it would (``inf`` if never)."""
        if bucket.calls is not None and len(self.entries) + 1 > bucket.calls:
            if bucket.calls <= 0:
                return "calls", math.inf
            oldest = self.entries[len(self.entries) - bucket.calls]
            return "calls", oldest.t + WINDOW_S - now
        if bucket.tokens is not None and self.tokens + need_tokens > bucket.tokens:
            if need_tokens > bucket.tokens:
                return "tokens", math.inf
            freed = 0
            for e in self.entries:
                freed += e.tokens
                if self.tokens - freed + need_tokens <= bucket.tokens:
                    return "tokens", e.t + WINDOW_S - now
            return "tokens", math.inf
        return None


def retry_after(wait_s: float) -> int | None:
    """Whole seconds to wait, rounded up (at least 1); None for never."""
    return None if math.isinf(wait_s) else max(1, math.ceil(wait_s))


class MemoryLimiter:
    """Sliding-log buckets in this process (the embedded default). Thread-safe; no I/O."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._reservations: dict[str, list[tuple[_Log, _Entry]]] = {}
        self._lock = threading.Lock()

    def reserve(self, plan: Plan, rid: str, tokens: int) -> Decision:
        """Admit and charge the request (one call, ``tokens`` tokens) to every required
        bucket and to the first group bucket with room — or refuse it, charging nothing."""
        with self._lock:
            now = self._clock()
            worst: tuple[Bucket, str, float] | None = None
            for b in plan.required:
                log = self._log(b.id, now)
                miss = log.wait_s(b, tokens, now)
                if miss is not None and (worst is None or miss[1] > worst[2]):
                    worst = (b, miss[0], miss[1])
            chosen: Bucket | None = None
            if plan.any_of:
                best: tuple[Bucket, str, float] | None = None
                for b in plan.any_of:
                    miss = self._log(b.id, now).wait_s(b, tokens, now)
                    if miss is None:
                        chosen = b
                        break
                    if best is None or miss[1] < best[2]:
                        best = (b, miss[0], miss[1])
                if chosen is None and best is not None and (worst is None
                                                            or best[2] > worst[2]):
                    worst = best
            if worst is not None:
                return Decision(False, worst[0], worst[1], retry_after(worst[2]))
            charged = [*plan.required, *([chosen] if chosen else [])]
            held = []
            for b in charged:
                log = self._logs[b.id]
                entry = _Entry(now, tokens)
                log.entries.append(entry)
                log.tokens += tokens
                held.append((log, entry))
            self._reservations[rid] = held
            return Decision(True, charged=tuple(b.id for b in charged))

    def settle(self, rid: str, tokens: int | None) -> None:
        """Reconcile the reservation to the real token count (None: release the tokens,
        the request failed); the call stays counted."""
        with self._lock:
            now = self._clock()
            actual = max(0, tokens or 0)
            for log, entry in self._reservations.pop(rid, []):
                log.prune(now)
                if entry.t > now - WINDOW_S:  # still in the window, so in the log's sum
                    log.tokens += actual - entry.tokens
                entry.tokens = actual

    def _log(self, bucket_id: str, now: float) -> _Log:
        log = self._logs.get(bucket_id)
        if log is None:
            log = self._logs[bucket_id] = _Log()
        log.prune(now)
        return log
