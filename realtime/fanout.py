"""Per-process fan-out: one channel-layer listener per event loop, delivering to local sockets.

Each stream with at least one local subscriber has this process's hub channel in its group,
so an event crosses the channel layer once per node, and is handed to each local subscriber
as the frame that was serialized once at publish time: no per-subscriber serialization,
query or thread hop. The hub also runs the heartbeat of its connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Protocol

from . import metrics
from .conf import realtime_settings
from .publisher import LAYER_MESSAGE_TYPE
from .streams import group_name

logger = logging.getLogger("realtime.fanout")


class Subscriber(Protocol):
    def deliver(self, message: dict[str, Any]) -> None: ...


class Ticking(Protocol):
    async def heartbeat(self, now: float) -> None: ...


def node_id() -> str:
    """This process's name in Connection rows."""
    configured = realtime_settings.NODE_ID
    return str(configured) if configured else f"{socket.gethostname()}:{os.getpid()}"


class Hub:
    """The listener and local subscriber table of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel: str | None = None
        self.members: dict[str, set[Subscriber]] = {}
        self.connections: set[Ticking] = set()
        # Listeners that are not Channels consumers (SSE) get their user's control messages
        # (authorization changes, logout) through the hub's channel.
        self.user_listeners: dict[Any, set[Any]] = {}
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0

    @property
    def layer(self) -> Any:
        from channels.layers import get_channel_layer

        return get_channel_layer(realtime_settings.CHANNEL_LAYER)

    async def _start(self) -> None:
        if self.channel is None:
            _freeze_startup_objects()
            self.channel = await self.layer.new_channel(prefix="realtime-hub.")
            self._tasks = [
                self.loop.create_task(self._listen(), name="realtime-hub-listen"),
                self.loop.create_task(self._tick(), name="realtime-hub-tick"),
            ]

    async def join(self, stream: str, subscriber: Subscriber) -> None:
        """Deliver the stream's events to `subscriber`; returns once the group is joined."""
        async with self._lock:
            await self._start()
            members = self.members.get(stream)
            if members is None:
                await self.layer.group_add(group_name(stream), self.channel)
                members = self.members[stream] = set()
            members.add(subscriber)

    async def leave(self, stream: str, subscriber: Subscriber) -> None:
        async with self._lock:
            members = self.members.get(stream)
            if members is None:
                return
            members.discard(subscriber)
            if not members:
                del self.members[stream]
                try:
                    await self.layer.group_discard(group_name(stream), self.channel)
                except Exception:
                    logger.warning("leaving group of %s failed", stream, exc_info=True)

    async def watch_user(self, user_id: Any, listener: Any) -> None:
        """Send `listener.control(message)` the control messages of one user."""
        from .consumers import user_group

        async with self._lock:
            await self._start()
            listeners = self.user_listeners.get(user_id)
            if listeners is None:
                await self.layer.group_add(user_group(user_id), self.channel)
                listeners = self.user_listeners[user_id] = set()
            listeners.add(listener)

    async def unwatch_user(self, user_id: Any, listener: Any) -> None:
        from .consumers import user_group

        async with self._lock:
            listeners = self.user_listeners.get(user_id)
            if listeners is None:
                return
            listeners.discard(listener)
            if not listeners:
                del self.user_listeners[user_id]
                await self.layer.group_discard(user_group(user_id), self.channel)

    async def add_connection(self, connection: Ticking) -> None:
        """Include a socket in this loop's heartbeat (and start the hub if it is the first)."""
        async with self._lock:
            await self._start()
        self.connections.add(connection)

    def remove_connection(self, connection: Ticking) -> None:
        self.connections.discard(connection)

    async def _listen(self) -> None:
        assert self.channel is not None
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("hub receive failed; retrying in 1s", exc_info=True)
                await asyncio.sleep(1)
                continue
            if message.get("type") != LAYER_MESSAGE_TYPE:
                for listener in tuple(self.user_listeners.get(message.get("user"), ())):
                    try:
                        listener.control(message)
                    except Exception:
                        logger.exception("control message to a listener failed")
                continue
            self.received += 1
            subscribers = tuple(self.members.get(message.get("stream", ""), ()))
            if not message.get("ephemeral"):
                sent_at = message.get("ts")
                if sent_at is not None:
                    metrics.LATENCY.observe(max(0.0, time.time() - sent_at))
                metrics.DELIVERED.inc(len(subscribers))
            for subscriber in subscribers:
                try:
                    subscriber.deliver(message)
                except Exception:
                    logger.exception("delivery to a subscriber failed")

    async def _tick(self) -> None:
        from channels.db import database_sync_to_async

        from .connections import touch_node

        while True:
            interval = float(realtime_settings.HEARTBEAT)
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in tuple(self.connections):
                try:
                    await connection.heartbeat(now)
                except Exception:
                    logger.exception("heartbeat failed")
            if self.connections:
                try:
                    await database_sync_to_async(touch_node, thread_sensitive=False)(node_id())
                except Exception:
                    logger.warning("updating this node's connections failed", exc_info=True)


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}
_frozen = False


def _freeze_startup_objects() -> None:
    """Once per process, before the first socket: collect, then freeze what is left."""
    global _frozen
    if _frozen or not realtime_settings.GC_FREEZE:
        return
    import gc

    _frozen = True
    gc.collect()
    gc.freeze()


def get_hub() -> Hub:
    """Return the hub of the running event loop."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for closed in [lp for lp in _hubs if lp.is_closed()]:
            del _hubs[closed]
        hub = _hubs[loop] = Hub(loop)
    return hub
