"""Token buckets for client publishes, per socket and per user: the user's on this node, or
in Redis for all nodes (`REALTIME["PUBLISH_USER_REDIS"]`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from typing import Any

from django.core.signals import setting_changed
from django.dispatch import receiver

from .conf import realtime_settings

logger = logging.getLogger("realtime.ratelimit")

_USERS_KEPT = 10_000
#: Seconds a shared bucket's take may wait on Redis before this node decides alone.
_REDIS_TIMEOUT = 1.0
#: Seconds between two warnings that the shared buckets are out of reach.
_WARN_EVERY = 60.0
#: Seconds this node leaves Redis alone after a take failed (each try may wait 1 s, and a
#: socket handles one frame at a time: its pings would queue behind stalled publishes).
_RETRY_AFTER = 5.0

# KEYS[1]: the user's bucket; ARGV: rate, burst. Redis's own clock, so nodes whose clocks
# differ refill it alike (TIME before a write needs effects replication: the default from
# Redis 5, asked for on older ones). Returns 1 if a token was taken. The key expires once
# the bucket would be full again (at most a day: at rate 0 it comes back full after a day),
# so idle users cost nothing.
_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local held = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(held[1]), tonumber(held[2])
if tokens == nil or stamp == nil then tokens, stamp = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
local full = 86400
if rate > 0 then full = math.min(86400, math.max(1, math.ceil((burst - tokens) / rate) + 1)) end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'stamp', string.format('%.17g', now))
redis.call('EXPIRE', KEYS[1], full)
return taken
"""


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` spends one if there is one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")  # one per socket: no __dict__

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """Return the token of a `take()` that another bucket then refused."""
        self.tokens = min(self.burst, self.tokens + 1.0)


_user_buckets: OrderedDict[Any, TokenBucket] = OrderedDict()


def user_bucket(user_id: Any) -> TokenBucket:
    """The bucket shared by all of one user's sockets on this node (bounded LRU)."""
    bucket = _user_buckets.get(user_id)
    if bucket is None:
        bucket = TokenBucket(realtime_settings.PUBLISH_RATE, realtime_settings.PUBLISH_BURST)
        _user_buckets[user_id] = bucket
        if len(_user_buckets) > _USERS_KEPT:
            _user_buckets.popitem(last=False)
    else:
        _user_buckets.move_to_end(user_id)
    return bucket


class _SharedBuckets:
    """The users' buckets in Redis, one client per event loop (as the presence backend's)."""

    def __init__(self) -> None:
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._warned = -math.inf
        self._resting_until = -math.inf  # Redis failed: per node until then

    def _client(self, url: str) -> Any:
        import redis.asyncio as redis

        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None or entry[0] != url:
            for closed in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[closed]  # its loop is gone: nothing can close it now
            if entry is not None:  # the setting changed: let the old client go
                _close_later(entry[1])
            # A bounded pool that waits for a free connection (within the take's timeout)
            # instead of failing when many sockets publish at once.
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=20,
                timeout=_REDIS_TIMEOUT,
                socket_timeout=_REDIS_TIMEOUT,
                socket_connect_timeout=_REDIS_TIMEOUT,
            )
            client = redis.Redis(connection_pool=pool)
            entry = self._clients[loop] = (url, client, client.register_script(_TAKE))
        return entry[2]

    async def take(self, url: str, prefix: str, user_id: Any) -> bool:
        """A token of the user's bucket on this node and of their shared one.

        The node's is taken first and given back when the shared one refuses, so the node's
        limit always holds: while Redis answers the shared bucket is the tighter one, and
        when it fails (no answer within 1 s, or an error) the node's alone decides, for
        `_RETRY_AFTER` seconds before Redis is asked again; a warning says so at most once
        a minute.
        """
        local = user_bucket(user_id)
        if not local.take():
            return False
        if time.monotonic() < self._resting_until:
            return True
        key = f"{prefix}:publish:{user_id}"
        args = [float(realtime_settings.PUBLISH_RATE), int(realtime_settings.PUBLISH_BURST)]
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                taken = bool(await self._client(url)(keys=[key], args=args))
        except Exception as exc:
            now = time.monotonic()
            self._resting_until = now + _RETRY_AFTER
            if now - self._warned >= _WARN_EVERY:
                self._warned = now
                logger.warning(
                    "shared publish buckets unavailable (%r); limiting per node for %.0f s",
                    exc,
                    _RETRY_AFTER,
                )
            return True  # the node's token, taken above
        if not taken:
            local.give_back()
        return taken


def _close_later(client: Any) -> None:
    """Close a client this loop no longer uses, without waiting for it."""
    task = asyncio.get_running_loop().create_task(client.aclose(close_connection_pool=True))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[Any]] = set()


_shared = _SharedBuckets()


async def take_user_token(user_id: Any) -> bool:
    """Whether the user may publish one more event now: their bucket shared by every node
    when `REALTIME["PUBLISH_USER_REDIS"]` names a Redis (`{"url": ..., "prefix": ...}`),
    else this node's."""
    shared = realtime_settings.PUBLISH_USER_REDIS
    if not shared:
        return user_bucket(user_id).take()
    prefix = shared.get("prefix") or realtime_settings.GROUP_PREFIX
    return await _shared.take(str(shared["url"]), str(prefix), user_id)


@receiver(setting_changed)
def _forget_user_buckets(setting: str, **kwargs: Any) -> None:
    """New `REALTIME` settings (tests): users' buckets are made again with its rate and burst."""
    if setting == "REALTIME":
        _user_buckets.clear()
        _shared._resting_until = -math.inf
