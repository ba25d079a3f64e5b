"""Reference 2 of the fan-out benchmark, the ceiling: a bare `websockets` server, no Django.

Each server process subscribes to one Redis pub/sub channel; the writer publishes every
event there as one pre-encoded frame, and the server hands it to all of its sockets with
`websockets.asyncio.server.broadcast`. Run as `fanout_ceiling.py --port P --redis-url URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve

#: The Redis pub/sub channel the writer publishes frames to (BENCH_FANOUT_PREFIX keeps runs
#: and tests on the same Redis server apart; BENCH_FANOUT_FLOOR_CHANNEL gives the daphne
#: floor's nodes a channel of their own when they run beside the ceiling's).
CHANNEL = os.environ.get("BENCH_FANOUT_PREFIX", "bench-fanout") + ".ceiling"
FLOOR_CHANNEL = CHANNEL + ".floor"
READY = json.dumps({"op": "reply", "ref": "1", "ok": True})

clients: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    clients.add(websocket)
    try:
        await websocket.send(READY)
        async for _message in websocket:
            pass  # pongs and nothing else
    finally:
        clients.discard(websocket)


async def relay(redis_url: str, subscribed: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    subscribed.set()
    async for message in pubsub.listen():
        if message["type"] == "message":
            broadcast(clients, message["data"], text=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    subscribed = asyncio.Event()
    task = asyncio.get_running_loop().create_task(relay(args.redis_url, subscribed))
    await asyncio.wait_for(subscribed.wait(), 10)
    async with serve(handler, "127.0.0.1", args.port, compression=None, max_queue=None) as server:
        print(f"ceiling serving on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        await server.serve_forever()
    task.cancel()


if __name__ == "__main__":
    asyncio.run(main())
