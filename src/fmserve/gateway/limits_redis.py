"""Rate-limit buckets in Redis, shared by every replica (``FMSERVE_REDIS_URL``).

The same sliding 60 s log as :class:`fmserve.gateway.limits.MemoryLimiter`, kept per
bucket in three keys — a sorted set of request ids scored by admission time (ms), a hash
of their token amounts, and the running token sum — and checked-and-reserved across all
of a request's buckets by **one Lua script**: Redis runs it atomically, so N replicas
admit exactly what one process would. Time is Redis' own (``TIME``), so replica clocks
do not matter. Keys expire two windows after their last use.

Unreachable Redis: the limiter raises :class:`LimiterUnavailable` within
``timeout_s`` (no hang); the gateway turns that into 503 + ``Retry-After`` (fail closed)
or admits and logs (``FMSERVE_RATE_LIMIT_FAIL_OPEN=1``). redis-py reconnects by itself,
so service resumes when Redis is back, without a restart.

``timeout_s`` is time Redis had to answer, not time this process was too busy to look:
a replica whose event loop lags (a burst of requests on a busy machine) must not call a
healthy Redis unreachable — the 503 would refuse a request that fits, and the script
may already have charged it. So the wait does not cancel the call (redis-py's own
socket timeout would, and loses the race to an answer that is already in the socket),
and the lateness of the loop, measured by a ticker, is not counted against Redis; a hard
cap (``cap_s``, 30 s: only a badly overloaded process gets near it) bounds every call.
Connections come from a blocking pool (``max_connections``): a burst waits for one
instead of failing with ``MaxConnectionsError`` at redis-py's default of 100.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fmserve.gateway.limits import Bucket, Decision, Plan, retry_after

PREFIX = "fmserve:rl:"
log = logging.getLogger("fmserve.gateway")

# KEYS: per bucket (zset, hash, sum). ARGV: window_ms, rid, tokens, n_required, then per
# bucket calls_limit, tokens_limit (-1 = none). Returns {admitted, bucket_index (1-based),
# dimension, wait_ms (-1 = never), chosen group index (0 = none)}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rid = ARGV[2]
local need = tonumber(ARGV[3])
local nreq = tonumber(ARGV[4])
local n = #KEYS / 3
local function prune(i)
  local z, h, s = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - window)
  if #old > 0 then
    local freed = 0
    for _, id in ipairs(old) do
      freed = freed + tonumber(redis.call('HGET', h, id) or '0')
      redis.call('HDEL', h, id)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now - window)
    redis.call('DECRBY', s, freed)
  end
end
-- nil if the request fits bucket i, else {dimension, wait_ms (-1 = never)}
local function miss(i)
  local z, h, s = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  local calls = tonumber(ARGV[3 + 2*i])
  local tokens = tonumber(ARGV[4 + 2*i])
  local count = redis.call('ZCARD', z)
  if calls >= 0 and count + 1 > calls then
    if calls <= 0 then return {'calls', -1} end
    local e = redis.call('ZRANGE', z, count - calls, count - calls, 'WITHSCORES')
    return {'calls', tonumber(e[2]) + window - now}
  end
  if tokens >= 0 then
    local used = tonumber(redis.call('GET', s) or '0')
    if used + need > tokens then
      if need > tokens then return {'tokens', -1} end
      local all = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
      local freed = 0
      for j = 1, #all, 2 do
        freed = freed + tonumber(redis.call('HGET', h, all[j]) or '0')
        if used - freed + need <= tokens then
          return {'tokens', tonumber(all[j+1]) + window - now}
        end
      end
      return {'tokens', -1}
    end
  end
  return nil
end
local function longer(a, b)  -- the longer wait; -1 (never) is longest
  if a == -1 or b == -1 then return -1 end
  return math.max(a, b)
end
for i = 1, n do prune(i) end
local worst_i, worst = 0, nil
for i = 1, nreq do
  local m = miss(i)
  if m and (worst == nil or longer(m[2], worst[2]) == m[2]) then worst_i, worst = i, m end
end
local chosen = 0
if n > nreq then
  local best_i, best = 0, nil
  for i = nreq + 1, n do
    local m = miss(i)
    if m == nil then chosen = i break end
    if best == nil or (m[2] ~= -1 and (best[2] == -1 or m[2] < best[2])) then
      best_i, best = i, m
    end
  end
  if chosen == 0 and (worst == nil or longer(best[2], worst[2]) == best[2]) then
    worst_i, worst = best_i, best
  end
end
if worst then return {0, worst_i, worst[1], worst[2], 0} end
local function charge(i)
  local z, h, s = KEYS[3*i-2], KEYS[3*i-1], KEYS[3*i]
  redis.call('ZADD', z, now, rid)
  redis.call('HSET', h, rid, need)
  redis.call('INCRBY', s, need)
  for _, k in ipairs({z, h, s}) do redis.call('PEXPIRE', k, 2 * window) end
end
for i = 1, nreq do charge(i) end
if chosen > 0 then charge(chosen) end
return {1, 0, '', 0, chosen}
"""

# KEYS: per bucket (zset, hash, sum). ARGV: rid, actual tokens.
_SETTLE = """
for i = 1, #KEYS / 3 do
  local h, s = KEYS[3*i-1], KEYS[3*i]
  local old = redis.call('HGET', h, ARGV[1])
  if old then
    redis.call('HSET', h, ARGV[1], ARGV[2])
    redis.call('INCRBY', s, tonumber(ARGV[2]) - tonumber(old))
  end
end
return 1
"""


class LimiterUnavailable(Exception):
    """The shared counters could not be reached in time."""


class _LoopLag:
    """Seconds this event loop has run late, summed: a ticker sleeps ``tick_s`` at a
    time and adds how much later than that it woke up."""

    def __init__(self, tick_s: float = 0.05) -> None:
        self.tick_s = tick_s
        self.total = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking on the running loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.tick_s)
            self.total += max(0.0, loop.time() - t - self.tick_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _keys(bucket_ids: list[str]) -> list[str]:
    return [PREFIX + b + suffix for b in bucket_ids for suffix in (":z", ":h", ":s")]


class RedisLimiter:
    """:class:`~fmserve.gateway.limits.MemoryLimiter`'s interface, async, on Redis."""

    def __init__(self, url: str, timeout_s: float = 1.0, cap_s: float = 30.0,
                 max_connections: int = 256) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.cap_s = cap_s  # the most any call may take, busy loop or not
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=self.cap_s,
            socket_timeout=self.cap_s, socket_connect_timeout=self.cap_s,
            health_check_interval=15)
        self._redis = aioredis.Redis.from_pool(pool)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._charged: dict[str, list[str]] = {}
        self._lag = _LoopLag()

    async def _call(self, call: Awaitable[Any]) -> Any:
        """``call``'s result once Redis answers; raises LimiterUnavailable when it has not
        within ``timeout_s`` of time this loop was free to see the answer (or ``cap_s``),
        and for any Redis or socket error."""
        self._lag.start()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(call)
        start, lag0 = loop.time(), self._lag.total
        try:
            while True:
                elapsed = loop.time() - start
                waited = elapsed - (self._lag.total - lag0)
                if waited >= self.timeout_s:
                    raise LimiterUnavailable(
                        f"rate-limit store at {self._safe_url()} did not answer within "
                        f"{self.timeout_s:g} s")
                if elapsed >= self.cap_s:
                    log.warning("rate-limit store call abandoned after %.0f s: this process "
                                "is too busy to read the answers in time", elapsed)
                    raise LimiterUnavailable(
                        f"no answer from the rate-limit store at {self._safe_url()} within "
                        f"{self.cap_s:g} s (this process is overloaded)")
                done, _ = await asyncio.wait(
                    {task}, timeout=min(self.timeout_s - waited, self.cap_s - elapsed))
                if not done:  # let what is queued behind this check run first: the
                    await asyncio.sleep(0)  # ticker's update, an answer already read
                if task.done():
                    return task.result()
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"rate-limit store at {self._safe_url()} unreachable: "
                                     f"{type(exc).__name__}") from None
        finally:
            if not task.done():
                task.cancel()

    async def reserve(self, plan: Plan, rid: str, tokens: int) -> Decision:
        """Raises: LimiterUnavailable when Redis does not answer within the timeout."""
        buckets: list[Bucket] = [*plan.required, *plan.any_of]
        args: list[Any] = [60_000, rid, int(tokens), len(plan.required)]
        for b in buckets:
            args += [-1 if b.calls is None else b.calls, -1 if b.tokens is None else b.tokens]
        out = await self._call(self._reserve(keys=_keys([b.id for b in buckets]), args=args))
        admitted, idx, dim, wait_ms, chosen = (int(out[0]), int(out[1]), out[2], int(out[3]),
                                               int(out[4]))
        if not admitted:
            dimension = dim.decode() if isinstance(dim, bytes) else str(dim)
            wait = float("inf") if wait_ms < 0 else wait_ms / 1000
            return Decision(False, buckets[idx - 1], dimension, retry_after(wait))
        charged = [b.id for b in plan.required]
        if chosen:
            charged.append(buckets[chosen - 1].id)
        self._charged[rid] = charged
        return Decision(True, charged=tuple(charged))

    async def settle(self, rid: str, tokens: int | None) -> None:
        """Reconcile (or release, ``tokens`` None) the reservation. A Redis failure here
        only logs upstream: the entry then keeps its reserved amount until it expires."""
        charged = self._charged.pop(rid, None)
        if not charged:
            return
        await self._call(self._settle(keys=_keys(charged), args=[rid, max(0, tokens or 0)]))

    def _safe_url(self) -> str:
        """The URL without a password."""
        head, sep, tail = self.url.partition("@")
        return (head.split("//")[0] + "//…@" + tail) if sep else self.url

    async def close(self) -> None:
        self._lag.stop()
        await self._redis.aclose()
