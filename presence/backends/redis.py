"""Presence in Redis, shared by every node: atomic Lua scripts, sorted sets by expiry.

Keys (under `prefix`, "presence" by default), per stream `s`:
- `<prefix>:s:<s>:c`  sorted set of "<user>|<connection>" scored by expiry time;
- `<prefix>:s:<s>:n`  hash "<user>|<connection>" -> node (for inspection);
- `<prefix>:s:<s>:u`  hash user -> number of live connections;
- `<prefix>:s:<s>:t`  hash user -> since (when the first connection joined);
- `<prefix>:streams`  set of streams that have entries (what sweepers walk).
Each script changes one stream's keys at once, so racing nodes agree on who joined or left;
a leave reports the `since` of the presence it ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import Change, Entry, PresenceBackend

_JOIN = """
local added = redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[5], ARGV[6])
if added == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
if n == 1 then
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[5])
  return 1
end
return 0
"""

_LEAVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if removed == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
if n <= 0 then
  local since = redis.call('HGET', KEYS[4], ARGV[2]) or '-1'  -- -1: unknown, still a leave
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[5], ARGV[3]) end
  return since
end
return 0
"""

_EXPIRE = """
local doomed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
local left = {}
for _, member in ipairs(doomed) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('HDEL', KEYS[2], member)
  local user = string.match(member, '^(.*)|')  -- the last bar: connection ids are hex
  local n = redis.call('HINCRBY', KEYS[3], user, -1)
  if n <= 0 then
    local since = redis.call('HGET', KEYS[4], user) or '0'
    redis.call('HDEL', KEYS[3], user)
    redis.call('HDEL', KEYS[4], user)
    table.insert(left, user)
    table.insert(left, since)
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[5], ARGV[3]) end
return left
"""


#: Streams read per pipeline by `members_many`.
_PIPELINE_CHUNK = 500


class RedisBackend(PresenceBackend):
    """CONFIG: `url`, `prefix`, `max_connections` (per event loop, default 20)."""

    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "presence", **config: Any
    ):
        super().__init__(url=url, prefix=prefix, **config)
        self.url = url
        self.prefix = prefix
        self.max_connections = int(config.get("max_connections", 20))
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def _client(self) -> Any:
        import redis.asyncio as redis

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for closed in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[closed]
            # A bounded pool that waits for a free connection (up to 5 s) instead of failing
            # when many sockets join at once.
            pool = redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=5,
                socket_timeout=5,
                socket_connect_timeout=5,
                decode_responses=True,
            )
            client = self._clients[loop] = redis.Redis(connection_pool=pool)
            client.presence_scripts = {  # type: ignore[attr-defined]
                "join": client.register_script(_JOIN),
                "leave": client.register_script(_LEAVE),
                "expire": client.register_script(_EXPIRE),
            }
        return client

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            # The pool was made here and handed to the client, which closes only pools it made.
            await client.aclose(close_connection_pool=True)

    def _keys(self, stream: str) -> list[str]:
        base = f"{self.prefix}:s:{stream}"
        return [f"{base}:c", f"{base}:n", f"{base}:u", f"{base}:t", f"{self.prefix}:streams"]

    async def join(
        self,
        stream: str,
        user_id: str,
        connection_id: str,
        node: str,
        expires_at: float,
        now: float,
    ) -> bool:
        client = self._client()
        member = f"{user_id}|{connection_id}"
        args = [member, user_id, node, expires_at, now, stream]
        return bool(await client.presence_scripts["join"](keys=self._keys(stream), args=args))

    async def leave(self, stream: str, user_id: str, connection_id: str) -> float | bool:
        client = self._client()
        args = [f"{user_id}|{connection_id}", user_id, stream]
        # 0 (not the last connection), else the since (text: Lua numbers reach us as integers)
        since = await client.presence_scripts["leave"](keys=self._keys(stream), args=args)
        return False if since in (0, "0") else float(since)

    async def refresh(
        self, entries: list[tuple[str, str, str]], node: str, expires_at: float, now: float
    ) -> list[Change]:
        if not entries:
            return []
        client = self._client()
        script = client.presence_scripts["join"]
        async with client.pipeline(transaction=False) as pipe:
            for stream, user_id, connection_id in entries:
                args = [f"{user_id}|{connection_id}", user_id, node, expires_at, now, stream]
                await script(keys=self._keys(stream), args=args, client=pipe)
            results = await pipe.execute()
        return [
            Change(stream, user_id, now)
            for (stream, user_id, _c), first in zip(entries, results, strict=True)
            if first
        ]

    async def members(self, stream: str) -> dict[str, float]:
        found = await self._client().hgetall(self._keys(stream)[3])
        return {user: float(since) for user, since in found.items()}

    async def members_many(self, streams: list[str]) -> dict[str, dict[str, float]]:
        client = self._client()
        members: dict[str, dict[str, float]] = {}
        for start in range(0, len(streams), _PIPELINE_CHUNK):  # bounded replies
            chunk = streams[start : start + _PIPELINE_CHUNK]
            async with client.pipeline(transaction=False) as pipe:
                for stream in chunk:
                    pipe.hgetall(self._keys(stream)[3])
                found = await pipe.execute()
            for stream, users in zip(chunk, found, strict=True):
                members[stream] = {user: float(since) for user, since in users.items()}
        return members

    async def expire(self, now: float, limit: int = 1000) -> list[Change]:
        client = self._client()
        left: list[Change] = []
        async for stream in client.sscan_iter(f"{self.prefix}:streams", count=200):
            found = await client.presence_scripts["expire"](
                keys=self._keys(stream), args=[now, limit, stream]
            )  # user, since, user, since, ...
            pairs = zip(found[::2], found[1::2], strict=True)
            left += [Change(stream, user, float(since)) for user, since in pairs]
            if len(left) >= limit:
                break
        return left

    async def entries(self, limit: int = 1000) -> list[Entry]:
        client = self._client()
        found: list[Entry] = []
        for stream in sorted(await client.smembers(f"{self.prefix}:streams")):
            keys = self._keys(stream)
            scored = await client.zrange(keys[0], 0, limit, withscores=True)
            nodes = await client.hgetall(keys[1])
            for member, expires_at in scored:
                user_id, _, connection_id = member.rpartition("|")
                found.append(
                    Entry(stream, user_id, connection_id, nodes.get(member, ""), expires_at)
                )
            if len(found) >= limit:
                break
        return found[:limit]
