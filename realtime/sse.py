"""Server-sent events at /realtime/sse/: the WebSocket's events and authorization, one way."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse

from . import hooks, metrics
from .conf import realtime_settings
from .connections import count_for_user
from .consumers import Subscription, _background, release_user
from .cursor import Position, encode
from .events import frame_field
from .fanout import get_hub, node_id
from .feed import (
    Answer,
    BadRequest,
    SignIn,
    method_not_allowed,
    parse_cursor,
    parse_streams,
    parse_version,
    release_request_connections,
    signed_in,
    starting_positions,
)
from .policies import (
    auth_hash,
    next_recheck,
    reload_user,
    stream_access,
    stream_kinds,
    streams_access,
)
from .protocol import Code
from .streams import parse_stream

logger = logging.getLogger("realtime.sse")

HEARTBEAT = 15.0
RETRY_MS = 3000
MAX_QUEUED = 10_000
LIMITED_RETRY_MS = 30_000  # `retry:` of a stream refused over the connection limit


def _db(func: Any) -> Any:
    return database_sync_to_async(func, thread_sensitive=False)


def _message(event: str, data: str, event_id: str | None = None) -> str:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head + f"data: {data}\n\n"


class SSEConnection:
    """One client's event stream: replay from its cursor, then live events, as SSE messages."""

    transport = "sse"
    resumed = False
    reconnect = False  # its client says it had a stream (or socket) before and lost it

    def __init__(
        self,
        user: Any,
        streams: list[str],
        positions: dict[str, Position],
        *,
        client_version: str = "",
        remote_addr: str = "",
        sign_in: SignIn | None = None,
        version: str | None = None,
        audiences: dict[str, str] | None = None,
        started_now: Collection[str] | None = None,
    ) -> None:
        self.connection_id = uuid.uuid4().hex
        self.user = user
        # What it was opened with (its session or its credentials), for the check that it
        # has not been signed out since; none given: as a ticket socket (a logout ends it).
        self.sign_in = sign_in or SignIn(None, None, auth_hash(user), time.time())
        self.client_version = client_version
        self.remote_addr = remote_addr
        self.recheck: asyncio.Task[None] | None = None
        self.authz_due = next_recheck(time.monotonic(), first=True)
        self.positions = dict(positions)
        self.version = version  # of the logged events' frames (None: each event's primary)
        self.subscriptions: dict[str, Subscription] = {}
        for stream in streams:
            kind, _key = parse_stream(stream)
            policy = stream_kinds.get(kind)
            assert policy is not None  # authorized already
            subscription = Subscription(
                self, stream, policy, version, (audiences or {}).get(stream)
            )
            subscription.contiguous = positions[stream].seq
            if started_now is not None and stream in started_now:
                # At the stream's newest seq, just read: nothing of it can have been pruned
                # unseen. A resumed stream's replay asks the log how far it went when its
                # first read finds nothing (its events may have been pruned since the check).
                subscription.newest = subscription.contiguous
            self.subscriptions[stream] = subscription
        self.outbox: collections.deque[str] = collections.deque()
        self.wakeup = asyncio.Event()
        self.closed = False
        #: Whether the `connected` hook ran, and the subscriptions the `subscribed` hook ran
        #: for (presence: the user is present there), so each gets its `unsubscribed` once.
        #: One hook step at a time (`hook_turn`): a revocation during a `subscribed` waits
        #: for it, so `unsubscribed` never overtakes it.
        self.hooked_connect = False
        self.hooked: dict[str, Subscription] = {}
        self.hook_turn = asyncio.Lock()

    @property
    def closing(self) -> bool:
        """As a socket's: ending, so presence stops refreshing its entries."""
        return self.closed

    # The sink Subscription delivers into.
    def send_event(self, stream: str, seq: int, event_type: str, frame: str) -> None:
        subscription = self.subscriptions.get(stream)
        if subscription is None:
            return  # refused meanwhile
        old = self.positions[stream]
        self.positions[stream] = Position(subscription.contiguous, old.epoch)
        if self.version is not None and not event_type.startswith(f"{self.version}:"):
            # `event_type` is the primary frame's; the frame sent may be another version's.
            event_type = frame_field(frame, "type") or event_type
        self.enqueue(_message(event_type or "message", frame, encode(self.positions)))

    def send_reset(self, stream: str, seq: int, epoch: str | None) -> None:
        self.positions[stream] = Position(seq, epoch)
        reset = {"op": "reset", "stream": stream, "epoch": epoch, "seq": seq}
        self.enqueue(_message("reset", json.dumps(reset), encode(self.positions)))

    def send_ephemeral(self, stream: str, event_type: str, frame: str) -> None:
        # Not logged, so no `id:`: the cursor (Last-Event-ID) stays at the last logged event.
        self.enqueue(_message(event_type or "message", frame))

    def enqueue(self, text: str) -> None:
        if self.closed:
            return
        if len(self.outbox) >= MAX_QUEUED:
            logger.warning(
                "slow SSE client %s: closing; it resumes by Last-Event-ID", self.connection_id
            )
            metrics.DROPPED.labels("slow_consumer").inc(len(self.outbox) + 1)
            self.closed = True
            # Dropped, as counted: the client resumes from the last id it read, and writing
            # these to one that does not read would only keep the stream open.
            self.outbox.clear()
        else:
            self.outbox.append(text)
        self.wakeup.set()

    def control(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "realtime.logout" or (
            kind == "realtime.disconnect" and message.get("connection") == self.connection_id
        ):
            self.closed = True
            self.wakeup.set()
        elif message.get("type") == "realtime.authz" and not self.closed:
            # One decision at a time, and none left running once the stream has ended; one
            # still waiting to start reads the permissions after this change too.
            if self.recheck_waiting:
                return
            self.recheck_waiting = True
            previous = self.recheck
            self.recheck = asyncio.get_running_loop().create_task(self._recheck(previous))

    recheck_waiting = False
    rechecks = 0  # decisions started: a catch-up's older one must not win

    async def _recheck(self, previous: asyncio.Task[None] | None = None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        self.recheck_waiting = False
        if self.closed:
            return
        self.rechecks += 1
        try:
            await self._decide_again()
        except Exception:
            # Whatever failed (the database, an authentication class), a decision that could
            # not be made must not leave the stream running on the old one: it ends, and the
            # client reconnects to a view that decides afresh.
            logger.exception("re-decision of %s failed; ending it", self.connection_id)
            self.closed = True
            self.wakeup.set()

    async def _decide_again(self) -> None:
        # The user as stored now: this copy is as old as the stream (is_superuser, is_active).
        user = await _db(reload_user)(self.user)
        if user is None or not user.is_active or not await _db(self.sign_in.still_signed_in)(user):
            # Gone, inactive, its password changed, logged out (the logout message was lost)
            # or its credentials no longer valid (a token deleted): the client reconnects, and
            # the view decides on its session or credentials as they are then.
            self.closed = True
            self.wakeup.set()
            return
        self.user = user
        hub = get_hub()
        decided = await _db(streams_access)(self.user, list(self.subscriptions))
        # Every decision takes effect before the first await: a refused stream must not go
        # on receiving while the leave of another one is awaited.
        ended = []
        for stream, (refused, audience) in decided.items():
            subscription = self.subscriptions.get(stream)
            if subscription is None:
                continue  # ended meanwhile
            if refused is None:
                subscription.audience = audience or None
                continue
            subscription.authorized = False
            del self.subscriptions[stream]
            frame = {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
            self.enqueue(_message("unsubscribed", json.dumps(frame)))
            ended.append((stream, subscription))
        for stream, subscription in ended:
            await hub.leave(stream, subscription)
            # Shielded: a stream that closes meanwhile cancels this decision, and the leave
            # must still be told (else its presence stays until the TTL runs out).
            await asyncio.shield(_background(self._unhook(stream, subscription, "forbidden")))
        if not self.subscriptions:
            self.closed = True
            self.wakeup.set()

    def open_row(self, limit: int) -> bool:
        """Write this stream's Connection row unless the user has `limit` connections already."""
        from .connections import open_connection, resolve_tenant

        return open_connection(
            connection_id=self.connection_id,
            user=self.user,
            node=node_id(),
            transport=self.transport,
            client_version=self.client_version,
            remote_addr=self.remote_addr,
            tenant=resolve_tenant(self.user),
            limit=limit,
        )

    async def run(
        self, resets: list[dict[str, Any]], limit: int, *, unplaced: bool = False
    ) -> AsyncGenerator[str, None]:
        hub = get_hub()
        # The row is written here, not in the view: a generator that never starts (the client
        # left before the response began) runs no `finally`, and would leave it for ever.
        opening = asyncio.ensure_future(_db(self.open_row)(limit))
        counted = False
        try:
            if not await asyncio.shield(opening):
                # Others of this user's connections got in since the view counted them. The
                # status (200) is sent already: say it in the body, and ask the browser to
                # wait long before it reconnects, as a 429 would.
                logger.info("SSE stream %s over the connection limit", self.connection_id)
                refusal = {
                    "op": "error",
                    "error": {
                        "code": "rate_limited",
                        "message": f"more than {limit} connections for this user",
                    },
                }
                yield f"retry: {LIMITED_RETRY_MS}\n\n"
                yield _message("rate_limited", json.dumps(refusal))
                return
            if not await self._joined(hub.watch_user(self.user.pk, self)):
                yield f"retry: {RETRY_MS}\n\n"
                return
            metrics.CONNECTS.labels("sse").inc()
            if self.reconnect:
                metrics.RECONNECTS.labels("sse").inc()
            metrics.CONNECTIONS.labels("sse").inc()
            counted = True
            if self.resumed:
                metrics.RESUMES.labels("sse").inc()
            # The view decided before this stream watched the user's permission messages,
            # so one sent in between reached nobody: decide again now that none can be
            # missed, before anything of a stream is joined or replayed. As a task, so a
            # message arriving meanwhile queues its decision after this one.
            self.recheck = asyncio.get_running_loop().create_task(self._recheck())
            if not await self._joined(self.recheck, "decide its streams"):
                yield f"retry: {RETRY_MS}\n\n"
                return
            resets = [reset for reset in resets if reset["stream"] in self.subscriptions]
            if self.closed:  # signed out since, or every stream refused (`unsubscribed` queued)
                yield f"retry: {RETRY_MS}\n\n" + "".join(self.outbox)
                return
            for stream, subscription in list(self.subscriptions.items()):
                if not await self._joined(hub.join(stream, subscription)):
                    yield f"retry: {RETRY_MS}\n\n"
                    return
                if not subscription.authorized:
                    # Refused while it was being joined (after its decision left the hub):
                    # leave again, or the hub would hold it for as long as the stream runs.
                    await hub.leave(stream, subscription)
            # Present (the presence app's hooks) before the first byte, as a socket is
            # before its subscribe reply.
            await self._hook_subscriptions()
            yield f"retry: {RETRY_MS}\n\n"
            for reset in resets:
                metrics.RESETS.labels("sse").inc()
                yield _message("reset", json.dumps(reset), encode(self.positions))
            if unplaced and not resets:
                # Streams that started now: an `id:` with no data dispatches no event, but sets
                # the browser's Last-Event-ID, so a reconnect before their first event resumes
                # from here instead of from a later now (and misses nothing in between).
                yield f"id: {encode(self.positions)}\n\n"
            for subscription in list(self.subscriptions.values()):
                if not subscription.authorized:
                    continue  # refused since; its `unsubscribed` is queued
                async for chunk in self._replay(subscription):
                    yield chunk
            while not self.closed:
                if time.monotonic() >= self.authz_due:  # as a socket does (a lost message)
                    self.authz_due = next_recheck(time.monotonic())
                    self.control({"type": "realtime.authz"})
                # Cleared before the outbox is looked at: whatever is queued after this
                # point sets it again, so the wait below cannot sleep on a queued event.
                self.wakeup.clear()
                if self.outbox:
                    # Everything queued since the last wake-up goes out as one chunk.
                    chunk = "".join(self.outbox)
                    self.outbox.clear()
                    yield chunk
                    continue  # events queued while the chunk was written go next
                if self.closed:
                    break
                try:
                    async with asyncio.timeout(HEARTBEAT):
                        await self.wakeup.wait()
                except TimeoutError:
                    yield ": heartbeat\n\n"
            while self.outbox:
                yield self.outbox.popleft()
        finally:
            self.closed = True
            if self.recheck is not None:
                self.recheck.cancel()
            if not opening.done():  # cancelled while the row was being written: let it land
                await asyncio.wait([opening])
            if counted:
                metrics.CONNECTIONS.labels("sse").dec()
            # In a task no later cancel cuts off (a browser gone: Django cancels the body,
            # and the server may cancel again), as a socket's (consumers.release_user).
            release = _background(self._release(hub))
            try:
                await asyncio.shield(release)
            except Exception:  # whatever failed: a row left behind counts against the limit
                logger.warning("closing the row of SSE stream %s failed", self.connection_id)

    async def _hook_subscriptions(self) -> None:
        """The connection hooks a socket calls, for an SSE stream's fixed set of streams: the
        presence app makes the user present in each (its hooks see `transport == "sse"`)."""
        if not hooks.registered():
            return
        self.hooked_connect = True
        await hooks.call("connected", self)
        for stream, subscription in list(self.subscriptions.items()):
            async with self.hook_turn:
                if self.closed:
                    return
                if self.subscriptions.get(stream) is not subscription:
                    continue  # refused since: there is nothing to be present in
                # Noted first: a stream cancelled mid-join still gets its `unsubscribed`.
                self.hooked[stream] = subscription
                await hooks.call("subscribed", self, stream, subscription.policy)

    async def _unhook(self, stream: str, subscription: Subscription, reason: str) -> None:
        """`unsubscribed` for a subscription `subscribed` was called for, once."""
        async with self.hook_turn:
            if self.hooked.get(stream) is not subscription:
                return
            del self.hooked[stream]
            await hooks.call("unsubscribed", self, stream, subscription.policy, reason)

    async def _release(self, hub: Any) -> None:
        # The leaves at once: on a stuck layer each may wait GROUP_TIMEOUT.
        ending = list(self.subscriptions.items())
        await asyncio.gather(
            *(hub.leave(stream, subscription) for stream, subscription in ending),
            return_exceptions=True,
        )
        # Every subscription still hooked, revoked ones whose decision was cut off included;
        # after a hook step in flight (the lock), at once (each may wait for an announcement
        # on a stuck layer), bounded.
        turns = asyncio.Semaphore(32)

        async def unsubscribed(stream: str, subscription: Subscription) -> None:
            async with turns:
                await hooks.call("unsubscribed", self, stream, subscription.policy, "disconnect")

        async with self.hook_turn:
            hooked = list(self.hooked.items())
            self.hooked.clear()
        await asyncio.gather(*(unsubscribed(s, sub) for s, sub in hooked))
        if self.hooked_connect:
            self.hooked_connect = False
            await hooks.call("disconnected", self)
        await release_user(hub, self.user.pk, self, self.connection_id)

    async def _joined(self, joining: Any, what: str = "join its groups") -> bool:
        """Await a hub join (or watch, or the first decision); False, logged, if it failed.

        The stream then ends (its `finally` leaves what was joined) and the browser comes
        back after its retry, as from any stream that ended, instead of the body raising.
        """
        try:
            await joining
        except Exception:
            logger.warning(
                "SSE stream %s could not %s; it ends, and the client retries",
                self.connection_id,
                what,
                exc_info=True,
                extra={"connection": self.connection_id},
            )
            return False
        return True

    def catch_up(self, subscription: Subscription) -> None:
        """Replay the log into a live subscription again (the hub found the layer stalled)."""
        if not self.closed:
            subscription.task = asyncio.get_running_loop().create_task(self._catch_up(subscription))

    async def _catch_up(self, subscription: Subscription) -> None:
        try:
            # A permission change announced while the layer was silent was lost with it:
            # decide again, about the user as stored now.
            runs = self.rechecks
            fresh = await _db(reload_user)(self.user)
            refused, audience = (
                ("gone", None)
                if fresh is None
                else await _db(stream_access)(fresh, subscription.stream)
            )
            if refused is not None:
                await self._recheck()
                return
            if self.rechecks == runs:  # else a decision begun since, on newer state, holds
                subscription.audience = audience or None
            async for _batch in subscription.replay_batches():
                if self.closed:
                    return
            subscription.go_live()
        except Exception:
            logger.exception("replay of %s failed on %s", subscription.stream, self.connection_id)
            self.closed = True  # the client resumes by Last-Event-ID
            self.wakeup.set()

    async def _replay(self, subscription: Subscription) -> AsyncIterator[str]:
        async for _batch in subscription.replay_batches():
            while self.outbox:
                yield self.outbox.popleft()
            if self.closed:
                break
        subscription.go_live()


async def sse_view(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """GET /realtime/sse/?streams=…: resumes from `Last-Event-ID` (or ?cursor=) on every stream."""
    if request.method != "GET":
        return method_not_allowed(["GET"])
    try:
        streams = parse_streams(request)
        version = parse_version(request)
    except BadRequest as exc:
        return exc.response(request)
    try:
        cursor = parse_cursor(request.headers.get("Last-Event-ID") or request.GET.get("cursor"))
    except BadRequest:  # a cursor we cannot read: start now, and say so with a reset per stream
        cursor = {s: Position(-1, "invalid") for s in streams}
    try:
        user, credentials, audiences = await signed_in(request, streams)
    except Answer as refused:
        return refused.response
    start = await _db(starting_positions)(streams, cursor)
    connection = SSEConnection(
        user,
        streams,
        start.positions,
        client_version=request.GET.get("v", ""),
        remote_addr=request.META.get("REMOTE_ADDR") or "",
        sign_in=SignIn.of(request, user, credentials),
        version=version,
        audiences=audiences,
        started_now={*start.unplaced, *(reset["stream"] for reset in start.resets)},
    )
    connection.resumed = cursor is not None
    # A client that had a stream before and lost it: EventSource's own retry sends
    # Last-Event-ID (a first request never does), the JS client `?reconnect=1`.
    connection.reconnect = request.GET.get("reconnect") == "1" or "Last-Event-ID" in request.headers
    limit = int(realtime_settings.MAX_CONNECTIONS_PER_USER)
    if await _db(count_for_user)(user) >= limit:
        # As a socket past the limit gets 4429: the client retries after its backoff.
        return BadRequest(
            Code.RATE_LIMITED, f"more than {limit} connections for this user", status=429
        ).response()
    await release_request_connections()
    response = StreamingHttpResponse(
        connection.run(start.resets, limit, unplaced=bool(start.unplaced)),
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"
    return response
