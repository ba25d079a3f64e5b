"""Diagnostic of the fan-out benchmark: daphne's own floor, no Django and no Channels.

A raw ASGI application served by daphne: each server process subscribes to a Redis pub/sub
channel of its own beside the ceiling's (`FLOOR_CHANNEL`, see fanout_ceiling.py) and hands
every pre-encoded frame to each of its sockets with `await send({"type": "websocket.send",
...})`, one after the other, in the listener task: no consumer, no per-socket task, no
serialization. What stays is daphne's path for one frame to one socket (Twisted, Autobahn
framing, the write), so the gap between this and the ceiling is the server's, and the gap
between ours and this is ours. Served as `fanout_daphne_floor:application`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from fanout_ceiling import FLOOR_CHANNEL

READY = json.dumps({"op": "reply", "ref": "1", "ok": True})

Send = Callable[[dict[str, Any]], Awaitable[None]]
sockets: set[Send] = set()
_listener: asyncio.Task[None] | None = None


def redis_url() -> str:
    import os

    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def relay() -> None:
    client = aioredis.Redis.from_url(redis_url(), socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(FLOOR_CHANNEL)
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        frame = {"type": "websocket.send", "text": message["data"].decode()}
        for send in tuple(sockets):
            try:
                await send(frame)
            except Exception:
                sockets.discard(send)


async def application(scope: dict[str, Any], receive: Any, send: Send) -> None:
    global _listener
    if scope["type"] == "lifespan":
        return
    if scope["type"] == "http":
        await receive()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if _listener is None or _listener.done():
        _listener = asyncio.get_running_loop().create_task(relay())
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": READY})
    sockets.add(send)
    try:
        while (await receive())["type"] != "websocket.disconnect":
            pass  # pongs
    finally:
        sockets.discard(send)
