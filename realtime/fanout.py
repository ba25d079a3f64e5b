"""Per-process fan-out: one channel-layer listener per event loop, delivering to local sockets.

Each stream with at least one local subscriber has this process's hub channel in its group,
so an event crosses the channel layer once per node, and is handed to each local subscriber
as the frame that was serialized once at publish time: no per-subscriber serialization,
query or thread hop. The hub also runs the heartbeat of its connections, and probes the
layer: a link to Redis that went silent without an error is noticed, reconnected, and every
subscription then reads the log for what it missed. Its tail check reads the log's position of
each stream it has subscribers of, so an event the layer lost with no later one on its stream
(nothing for a subscriber to see a gap by) still arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from . import metrics
from .conf import realtime_settings
from .publisher import LAYER_MESSAGE_TYPE, event_fields, logged_at
from .streams import group_name

logger = logging.getLogger("realtime.fanout")

PROBE_MESSAGE_TYPE = "realtime.probe"
HEARTBEAT_SLICES = 10
FLUSH_CHUNK = 50  # sockets sent to between two turns of the event loop
WAITED = 0.001  # seconds the hub waited for an event: no backlog, send it in chunks
TAIL_CHUNK = 500  # stream names per query of the tail check (SQLite once took 999 at most)
TAIL_TURN = 5000  # subscribers the tail check looks at between two turns of the event loop


class Subscriber(Protocol):
    def deliver(self, message: dict[str, Any]) -> None: ...

    def resync(self) -> None: ...


class Ticking(Protocol):
    def heartbeat(self, now: float) -> None: ...


class Flushable(Protocol):
    def flush_queued(self) -> None: ...


def _group_timeout() -> float:
    return float(realtime_settings.GROUP_TIMEOUT)


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
        # One lock per group, not one per hub: a group_add stuck on one group (a pub/sub shard
        # whose lock a stuck publish holds) must not hold up every other join and leave.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._starting = asyncio.Lock()
        self._undoing: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0
        self.chunked = 0  # turns of the loop given between chunks of an event's sockets
        # While the hub hands one event to its subscribers, sockets that queued a frame
        # and have no writer running are listed here; the hub then sends for all of them
        # itself (`flush_queued`), rather than starting a task per socket per event.
        self.batch: list[Flushable] | None = None
        self.answered = 0.0  # when a probe last came back through the layer
        self.stalled = False

    @property
    def layer(self) -> Any:
        from channels.layers import get_channel_layer

        return get_channel_layer(realtime_settings.CHANNEL_LAYER)

    async def _start(self) -> None:
        if self.channel is not None:
            return
        # Bounded like every other layer call (the pub/sub layer subscribes the new channel).
        async with asyncio.timeout(_group_timeout()):
            async with self._starting:
                if self.channel is None:
                    _tune_gc()
                    self.channel = await self.layer.new_channel(prefix="realtime-hub.")
                    self.answered = time.monotonic()
                    self._spawn()

    def _spawn(self) -> None:
        # Each in a context of its own: the hub outlives the request that started it, whose
        # correlation id would otherwise mark every line it logs (lines about one event name
        # its correlation id themselves, `event_fields`).
        self._tasks = [
            self.loop.create_task(coro, name=name, context=contextvars.Context())
            for coro, name in (
                (self._listen(), "realtime-hub-listen"),
                (self._tick(), "realtime-hub-tick"),
                (self._probe(), "realtime-hub-probe"),
                (self._renew_groups(), "realtime-hub-groups"),
                (self._tail_check(), "realtime-hub-tail"),
            )
        ]

    @contextlib.asynccontextmanager
    async def _locked(self, group: str) -> AsyncIterator[None]:
        """Hold the group's lock; the entry goes once no one holds or waits for it."""
        entry = self._locks.get(group)
        if entry is None:
            entry = self._locks[group] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0] and self._locks.get(group) is entry:
                del self._locks[group]

    async def _enter(self, table: dict[Any, set[Any]], key: Any, group: str, member: Any) -> None:
        """Add `member` under `key`; the first one adds the hub's channel to `group`.

        The group's lock orders its group_add and group_discard, so the layer's membership
        and the table agree. The wait for that lock and the layer call together take at most
        GROUP_TIMEOUT: a layer that does not answer fails this join (TimeoutError) instead of
        holding it, and every later one of the group, for good.
        """
        members = table.get(key)
        if members is not None:  # the group is joined already: no layer call, no wait
            members.add(member)
            return
        await self._start()
        timeout = _group_timeout()
        called = False
        try:
            async with asyncio.timeout(timeout), self._locked(group):
                members = table.get(key)
                if members is None:
                    called = True
                    await self.layer.group_add(group, self.channel)
                    members = table[key] = set()
                members.add(member)
        except BaseException as exc:  # a time-out, a layer error, or the caller cancelled
            if called and table.get(key) is None:
                # The layer may have added the channel before the call was cut off: take it
                # out again (in the background, under the group's lock) rather than leave
                # this node in a group it has no one for.
                task = self.loop.create_task(
                    self._undo(table, key, group), context=contextvars.Context()
                )
                self._undoing.add(task)  # held: the loop keeps only a weak reference
                task.add_done_callback(self._undoing.discard)
            if isinstance(exc, TimeoutError):
                logger.warning(
                    "joining group %s timed out after %.1fs",
                    group,
                    timeout,
                    extra={"stream": key} if table is self.members else {"user": key},
                )
            raise

    async def _undo(self, table: dict[Any, set[Any]], key: Any, group: str) -> None:
        try:
            async with asyncio.timeout(_group_timeout()), self._locked(group):
                if table.get(key) is None:
                    await self.layer.group_discard(group, self.channel)
        except Exception:
            logger.info("leaving group %s after a failed join failed", group, exc_info=True)

    async def _exit(self, table: dict[Any, set[Any]], key: Any, group: str, member: Any) -> None:
        """Remove `member`; the last one takes the hub's channel out of `group` (bounded)."""
        members = table.get(key)
        if (members is None or member not in members) and group in self._locks:
            # A join of `member` may be under way, its group_add not back yet: it adds the
            # member once it is, after this returned, for good. Wait for the group's lock
            # (that join is bounded as this wait is, and began earlier), then look again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_group_timeout()), self._locked(group):
                    pass
            members = table.get(key)
        if members is None or member not in members:
            return
        members.discard(member)
        if members:
            return
        del table[key]
        try:
            async with asyncio.timeout(_group_timeout()), self._locked(group):
                if table.get(key) is None:  # not joined again while this waited
                    await self.layer.group_discard(group, self.channel)
        except Exception:
            # The channel may stay in the group: its events reach this node for no one
            # (until the layer's group_expiry, or the next join and leave).
            logger.warning(
                "leaving group %s failed",
                group,
                exc_info=True,
                extra={"stream": key} if table is self.members else {"user": key},
            )

    async def join(self, stream: str, subscriber: Subscriber) -> None:
        """Deliver the stream's events to `subscriber`; returns once the group is joined.

        Raises (TimeoutError after GROUP_TIMEOUT) when the channel layer cannot add this
        node to the stream's group; `subscriber` is then not a member.
        """
        await self._enter(self.members, stream, group_name(stream), subscriber)

    async def leave(self, stream: str, subscriber: Subscriber) -> None:
        await self._exit(self.members, stream, group_name(stream), subscriber)

    async def watch_user(self, user_id: Any, listener: Any) -> None:
        """Send `listener.control(message)` the control messages of one user (raises as join)."""
        from .consumers import user_group

        # Keyed by text: a message carries the id as `wire_id` made it, and a caller of
        # `permissions_changed` may give "7" for 7.
        await self._enter(self.user_listeners, str(user_id), user_group(user_id), listener)

    async def unwatch_user(self, user_id: Any, listener: Any) -> None:
        from .consumers import user_group

        await self._exit(self.user_listeners, str(user_id), user_group(user_id), listener)

    async def add_connection(self, connection: Ticking) -> None:
        """Include a socket in this loop's heartbeat (and start the hub if it is the first)."""
        await self._start()
        self.connections.add(connection)

    def remove_connection(self, connection: Ticking) -> None:
        self.connections.discard(connection)

    async def _listen(self) -> None:
        assert self.channel is not None
        while True:
            asked = self.loop.time()
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("hub receive failed; retrying in 1s", exc_info=True)
                await asyncio.sleep(1)
                continue
            if message.get("type") == PROBE_MESSAGE_TYPE:
                self._answered()
                continue
            if message.get("type") != LAYER_MESSAGE_TYPE:
                for listener in tuple(self.user_listeners.get(str(message.get("user")), ())):
                    try:
                        listener.control(message)
                    except Exception:
                        logger.exception(
                            "control message to a listener failed",
                            extra=_fields(listener, {"user": message.get("user")}),
                        )
                continue
            self.received += 1
            subscribers = tuple(self.members.get(message.get("stream", ""), ()))
            written = None
            if not message.get("ephemeral"):
                metrics.DELIVERED.inc(len(subscribers))
                if subscribers:
                    written = logged_at(message)
            self.batch = []
            try:
                for subscriber in subscribers:
                    try:
                        subscriber.deliver(message)
                    except Exception:
                        # The event is not lost (the subscriber resumes from the log), but
                        # this is where to look when one seems to be: name it.
                        logger.exception(
                            "delivery to a subscriber failed",
                            extra=_fields(subscriber, event_fields(message)),
                        )
            finally:
                batch, self.batch = self.batch, None
            # A server may hold every write until the event loop's next turn (daphne does).
            # When the hub had to wait for this event, it yields between chunks, so the
            # first sockets' frames leave while it sends to the rest (latency). When the
            # event was already waiting, more are behind it: one go is cheaper (throughput).
            # A socket whose turn has not come yet starts its own writer if something else
            # is queued for it meanwhile (`_wake_writer`), in order.
            chunk = FLUSH_CHUNK if self.loop.time() - asked > WAITED else len(batch)
            for start in range(0, len(batch), chunk or 1):
                if start:
                    await asyncio.sleep(0)
                self._flush(batch[start : start + chunk], message)
                self.chunked += bool(start)
            if written is not None:  # once per event, when every local subscriber has it
                metrics.LATENCY.observe(max(0.0, time.time() - written))

    def _end_batch(self) -> None:
        """Send what the sockets of the current batch queued, and end the batch."""
        batch, self.batch = self.batch or [], None
        self._flush(batch)

    @staticmethod
    def _flush(batch: list[Flushable], message: dict[str, Any] | None = None) -> None:
        for sink in batch:
            try:
                sink.flush_queued()
            except Exception:
                # `message`: the event whose frames were being sent (None: a heartbeat's).
                logger.exception(
                    "sending to a socket failed",
                    extra=_fields(sink, event_fields(message) if message else {}),
                )

    async def _tick(self) -> None:
        """Heartbeats: each connection once per HEARTBEAT, a tenth of them at a time.

        Pinging every socket at once would make every client answer at once: with thousands
        of sockets, that burst of pings and pongs delays the events around it.
        """
        from channels.db import database_sync_to_async

        from .connections import touch_node

        turn = 0
        while True:
            await asyncio.sleep(float(realtime_settings.HEARTBEAT) / HEARTBEAT_SLICES)
            now = time.monotonic()
            self.batch = []
            try:
                for connection in tuple(self.connections):
                    if hash(connection) % HEARTBEAT_SLICES != turn:
                        continue
                    try:
                        connection.heartbeat(now)
                    except Exception:
                        logger.exception("heartbeat failed", extra=_fields(connection, {}))
            finally:
                self._end_batch()
            turn = (turn + 1) % HEARTBEAT_SLICES
            # SSE streams have no heartbeat here but rows of their own, and watch their user.
            if turn == 0 and (self.connections or self.user_listeners):
                held = {
                    getattr(listener, "connection_id", None)
                    for listeners in self.user_listeners.values()
                    for listener in listeners
                } | {getattr(c, "connection_id", None) for c in self.connections}
                held.discard(None)
                try:
                    await database_sync_to_async(touch_node, thread_sensitive=False)(
                        node_id(), held
                    )
                except Exception:
                    logger.warning("updating this node's connections failed", exc_info=True)

    async def _renew_groups(self) -> None:
        """Add the hub's channel to its groups again, within the layer's `group_expiry`.

        Channels' in-memory layer and channels-redis' core layer drop a group member after
        `group_expiry` (a day by default) however busy it is: a stream followed for longer
        would go silent, with no error. (The pub/sub layer has no expiry: nothing to do.)
        """
        from .consumers import user_group

        while True:
            expiry = getattr(self.layer, "group_expiry", None)
            if not expiry:
                await asyncio.sleep(3600)  # a layer swapped in by settings is looked at again
                continue
            await asyncio.sleep(max(float(expiry) / 4, 0.1))
            groups: list[tuple[dict[Any, Any], Any, str]] = [
                (self.members, s, group_name(s)) for s in self.members
            ]
            groups += [(self.user_listeners, u, user_group(u)) for u in self.user_listeners]
            for held, key, group in groups:
                try:
                    # Under the group's lock: not interleaved with a leave's group_discard.
                    async with asyncio.timeout(_group_timeout()), self._locked(group):
                        if key in held:  # else left meanwhile
                            await self.layer.group_add(group, self.channel)
                except Exception:
                    logger.warning("renewing group %s failed", group, exc_info=True)

    async def _probe(self) -> None:
        """Send a message to this hub's channel every LAYER_PROBE_INTERVAL, through the layer.

        A link to Redis that stalls without a reset (a partition, a lost NAT entry, a frozen
        server) raises no error: the subscription just goes quiet. When no probe has come
        back for two intervals, the layer's connections of this loop are reopened (again
        every two intervals while it stays silent); the first probe that comes back then
        resyncs every subscription from the log.
        """
        assert self.channel is not None
        reconnected = 0.0
        while True:
            interval = realtime_settings.LAYER_PROBE_INTERVAL
            if not interval:  # off; look at the setting again later
                self.answered = time.monotonic()
                await asyncio.sleep(float(realtime_settings.HEARTBEAT))
                continue
            interval = float(interval)
            woke = time.monotonic() + interval
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - woke > interval:
                # This loop itself is overloaded (a handshake storm): a late answer proves
                # nothing about the link, and a reconnect and resync would add to the load.
                # Start counting the silence again from now, with a fresh probe.
                logger.info("event loop %.1fs late; layer probe verdict skipped", now - woke)
                self.answered = now
            silent = now - self.answered
            if silent > 2 * interval and now - reconnected > 2 * interval:
                reconnected = now
                done = await reconnect_layer(self.layer)
                if not self.stalled:
                    self.stalled = True
                    metrics.LAYER_STALLS.inc()
                    logger.warning(
                        "channel layer silent for %.1fs on %s: %s; %d subscriptions resync "
                        "from the log once it answers",
                        silent,
                        node_id(),
                        "reconnecting" if done else "cannot reconnect this layer, waiting",
                        sum(len(members) for members in self.members.values()),
                    )
                else:
                    logger.info("channel layer still silent after %.1fs: reconnecting", silent)
            try:
                async with asyncio.timeout(interval):
                    await self.layer.send(self.channel, {"type": PROBE_MESSAGE_TYPE})
            except Exception:
                pass  # a probe that cannot be sent does not come back: that is the signal

    async def _tail_check(self) -> None:
        """Every TAIL_CHECK_INTERVAL, resync the subscriptions behind the previous check's log.

        Pub/sub is at-most-once: a subscription sees a lost event by the gap before the next
        one, and never when none follows. So the hub reads each of its streams' `last_seq`
        (in a thread, TAIL_CHUNK names a query), and a live subscription whose `contiguous`
        is still below what the previous read found, which gave the event a whole interval
        to arrive, reads the log again. Subscribers without a position (the long poll's
        waker, which reads the log when its wait ends) are left alone.
        """
        from channels.db import database_sync_to_async

        committed: dict[str, int] = {}  # each stream's last_seq at the previous check
        while True:
            interval = realtime_settings.TAIL_CHECK_INTERVAL
            if not interval:  # off; look at the setting again later
                committed = {}
                await asyncio.sleep(float(realtime_settings.HEARTBEAT))
                continue
            interval = float(interval)
            woke = time.monotonic() + interval
            await asyncio.sleep(interval)
            late = time.monotonic() - woke
            if not self.members:
                committed = {}
                continue
            try:
                read = await database_sync_to_async(_last_seqs, thread_sensitive=False)(
                    list(self.members)
                )
            except Exception:
                # The previous read stays what the next check holds subscribers to.
                logger.warning("tail check: reading stream positions failed", exc_info=True)
                continue
            # A stalled layer: the probe resyncs everything once it answers. An overloaded
            # loop: the events may be queued for the hub itself, and resyncs add to the load.
            if not self.stalled and late <= interval:
                await self._resync_behind(committed)
            committed = read

    async def _resync_behind(self, committed: dict[str, int]) -> None:
        resynced = looked_at = 0
        for stream, seq in committed.items():
            members = self.members.get(stream)
            if not members:
                continue  # left since the read
            if looked_at >= TAIL_TURN:  # a turn of the loop for the sockets now and then
                looked_at = 0
                await asyncio.sleep(0)
            looked_at += len(members)
            for subscriber in tuple(members):
                contiguous = getattr(subscriber, "contiguous", None)
                if contiguous is None or contiguous >= seq:
                    continue
                if getattr(subscriber, "replaying", False):
                    continue  # its replay reads the log to the end anyway
                if not getattr(subscriber, "authorized", True):
                    continue  # refused: being removed
                try:
                    subscriber.resync()
                except Exception:
                    logger.exception(
                        "resync of a subscriber failed",
                        extra=_fields(subscriber, {"stream": stream}),
                    )
                    continue
                resynced += 1
        if resynced:
            metrics.TAIL_RESYNCS.inc(resynced)
            logger.warning(
                "tail check on %s: %d subscriptions behind the log resync (live events lost "
                "by the channel layer)",
                node_id(),
                resynced,
            )

    def _answered(self) -> None:
        self.answered = time.monotonic()
        if not self.stalled:
            return
        self.stalled = False
        subscribers = [s for members in self.members.values() for s in members]
        logger.warning(
            "channel layer answers again on %s; %d subscriptions resync from the log",
            node_id(),
            len(subscribers),
        )
        # Subscribed again before this probe came back: whatever commits from now on
        # arrives live, and the log holds what the stall lost.
        for subscriber in subscribers:
            try:
                subscriber.resync()
            except Exception:
                logger.exception(
                    "resync of a subscriber failed",
                    extra=_fields(subscriber, {"stream": getattr(subscriber, "stream", None)}),
                )


def _fields(target: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` and the connection of `target` (a socket, an SSE stream, or a subscription of
    one), for a log line's `extra`."""
    owner = getattr(target, "consumer", target)  # a Subscription's sink is its connection
    connection = getattr(owner, "connection_id", None)
    extra = {key: value for key, value in fields.items() if value is not None}
    if connection is not None:
        extra["connection"] = connection
    return extra


def _last_seqs(streams: list[str]) -> dict[str, int]:
    """Each stream's `last_seq`, TAIL_CHUNK names a query; streams with no row are left out."""
    from .models import Stream

    seqs: dict[str, int] = {}
    for start in range(0, len(streams), TAIL_CHUNK):
        names = streams[start : start + TAIL_CHUNK]
        seqs.update(Stream.objects.filter(name__in=names).values_list("name", "last_seq"))
    return seqs


async def reconnect_layer(layer: Any) -> bool:
    """Reopen this loop's connections of a channels-redis pub/sub layer; False for others.

    channels-redis has no API for it, so this reaches into `RedisPubSubChannelLayer` 4.x, as
    its own `flush()` does, but keeps every subscription: each shard's receive task is
    stopped, its connection pool closed (which also fails a publish stuck on a dead
    connection, so it no longer holds the shard's lock), and a new receive task started. Its
    redis-py `PubSub` connects again and subscribes to all of its channels.
    """
    # Read through __dict__: the layer's __getattr__ would build a loop layer to look in.
    loop_layer = (getattr(layer, "__dict__", {}).get("_layers") or {}).get(
        asyncio.get_running_loop()
    )
    shards = getattr(loop_layer, "__dict__", {}).get("_shards")
    if not shards or not all(hasattr(shard, "_ensure_receiver") for shard in shards):
        return False
    for shard in shards:
        receiver = shard.__dict__.get("_receive_task")
        try:
            if receiver is not None:
                receiver.cancel()
                shard._receive_task = None
                await asyncio.wait([receiver], timeout=1.0)
            client = shard.__dict__.get("_redis")
            if client is not None:
                async with asyncio.timeout(5.0):
                    await client.connection_pool.disconnect()
        except Exception:
            logger.warning("closing a channel layer connection failed", exc_info=True)
        finally:
            if receiver is not None:
                shard._ensure_receiver()
    return True


_hubs: dict[asyncio.AbstractEventLoop, Hub] = {}
_gc_tuned = False


def _tune_gc() -> None:
    """Once per process, before the first socket: `GC_THRESHOLDS`, then `GC_FREEZE`."""
    global _gc_tuned
    if _gc_tuned:
        return
    import gc

    _gc_tuned = True
    thresholds = realtime_settings.GC_THRESHOLDS
    if thresholds is not None:
        gc.set_threshold(*thresholds)
    if realtime_settings.GC_FREEZE:
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
