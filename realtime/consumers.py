"""The WebSocket endpoint `/ws/realtime/`, protocol v1 (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.sessions import InstanceSessionWrapper
from channels.utils import await_many_dispatch

from . import hooks, metrics, protocol
from .conf import realtime_settings
from .events import pick_frame
from .fanout import get_hub, node_id
from .policies import (
    StreamPolicy,
    auth_hash,
    next_recheck,
    same_password,
    signed_out,
    stream_kinds,
    streams_access,
)
from .protocol import Close, Code, ProtocolError
from .ratelimit import TokenBucket, take_user_token
from .streams import parse_stream, wire_id

logger = logging.getLogger("realtime.ws")

_DUPLICATE_WINDOW = 1024
_background_tasks: set[asyncio.Task[None]] = set()


def _background(coro: Any) -> asyncio.Task[Any]:
    """Run `coro` in a task the module holds until it ends (the loop keeps a weak reference)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)
    return task


async def release_user(hub: Any, user_pk: Any, listener: Any, connection_id: str) -> None:
    """Stop watching the user's control messages and delete the connection's row.

    Run as a background task and awaited shielded: a server that cancels the closing
    connection again and again (daphne does, every second past its close timeout, while a
    stuck layer makes each leave wait GROUP_TIMEOUT) must not cut this off half way. Left
    undone, the row would count against the user's connection limit, and the hub would keep
    the listener and the user's group, for as long as the process runs.
    """
    from .connections import close_connection

    try:
        await hub.unwatch_user(user_pk, listener)
    except Exception:
        logger.warning("unwatching the user of %s failed", connection_id, exc_info=True)
    finally:
        await _thread(close_connection)(connection_id)


_PING = protocol.dumps({"op": "ping"})


class _Queued:
    """`RealtimeConsumer.writer` while its frames wait for the hub's flush (a task's stand-in:
    not done, nothing to cancel)."""

    def done(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False


QUEUED = _Queued()


def _frames_to(send: Any) -> Any:
    """Where a socket's `websocket.send` messages go: past Channels' session wrapper.

    `SessionMiddleware` wraps the send of every connection. Its send acts on
    `http.response.start` only (it saves the session and sets the cookie); for any other
    message it reads the lazy session's `modified` and `is_empty()` and passes the message
    on to the send it wraps. Per frame, to thousands of sockets, that read was about 8% of a
    node's CPU in the fan-out benchmark, for nothing: frames go to the wrapped send. Only the
    exact class is passed (a subclass may do something with frames), and only for frames.
    """
    wrapper = getattr(send, "__self__", None)
    while type(wrapper) is InstanceSessionWrapper and callable(
        inner := wrapper.__dict__.get("real_send")
    ):
        send = inner
        wrapper = getattr(send, "__self__", None)
    return send


class _Resumed:
    """Await a coroutine that already ran, by hand, up to the point where it suspended.

    `flush_queued` steps each send itself, so a send that completes at once (daphne's
    always does) costs no task. One that suspends, on a server that makes sends wait for
    the client, is finished by awaiting this in a task: the value the coroutine yielded goes
    up to the task, and what the task sends or throws back goes down to the coroutine, as
    if the task had run it from the start.
    """

    def __init__(self, coro: Any, yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Any:
        coro, value = self.coro, self.yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task's cancellation, passed down
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def user_group(user_id: Any) -> str:
    """The control group of one user's sockets, on every node."""
    return f"{realtime_settings.GROUP_PREFIX}-ctl.user.{user_id}"


def _thread(func: Any) -> Any:
    # Policies, replay and connection rows touch the database: never on the event loop.
    # Channels' wrapper closes stale connections around the call, as for its consumers.
    return database_sync_to_async(func, thread_sensitive=False)


class Subscription:
    """One socket's subscription to one stream: authorization, replay seam, dedupe by seq."""

    def __init__(
        self,
        consumer: Any,
        stream: str,
        policy: StreamPolicy,
        version: str | None,
        audience: str | None = None,
    ) -> None:
        # `consumer` is the sink: connection_id, user, transport, send_ephemeral(stream, type,
        # text) for events that are not logged, send_event(stream, seq, type, text) for logged
        # ones, and send_reset(stream, seq, epoch) for history the replay found pruned.
        self.consumer = consumer
        self.stream = stream
        self.policy = policy
        self.version = version
        # The user's id as a client event's `originUser` carries it: one comparison per event.
        pk = getattr(getattr(consumer, "user", None), "pk", None)
        self.user_wire_id = None if pk is None else wire_id(pk)
        # Whose payload variant it gets (StreamPolicy.audiences); "" or None: the default one.
        # Decided with the authorization, and again whenever that is.
        self.audience = audience or None
        self.authorized = True
        self.replaying = True
        # A list: empty, as it is once live, it takes a few bytes (a deque takes a block).
        self.buffer: list[dict[str, Any]] = []
        self.overflowed = False
        self.task: asyncio.Task[None] | None = None
        self.contiguous = 0  # every seq up to this one was delivered (or predates the snapshot)
        # Seqs delivered beyond `contiguous`: almost always none, so an empty tuple until
        # one comes (an empty set is 216 bytes, per subscription).
        self.above: set[int] | tuple[()] = ()
        # A seq the log had committed when the replay began (the position a subscribe read),
        # or None when that is not known (a resync, a cursor): a replay that reads nothing
        # while this is beyond `contiguous` found those events pruned, with no row to say so.
        self.newest: int | None = None

    def deliver(self, message: dict[str, Any]) -> None:
        """Called by the hub for each event of the stream; never awaits."""
        if not self.authorized:
            metrics.DROPPED.labels("unauthorized").inc()
            return
        if message.get("ephemeral") and not self.replaying:
            # Client events and presence diffs: not logged, never back to the sending user.
            if message.get("origin") == self.consumer.connection_id:
                return
            sender = message.get("originUser")
            if sender is not None and sender == self.user_wire_id:
                return
            self.consumer.send_ephemeral(
                self.stream, message.get("eventType", ""), message["frames"]["*"]
            )
            return
        if self.replaying:
            # Held in arrival order, ephemeral ones too: a presence diff dropped here would
            # leave the client's member list wrong until the member next joins or leaves.
            bound = int(realtime_settings.REPLAY_BUFFER)
            if len(self.buffer) >= bound:
                # Logged events come back from the log (the replay loop reads it again);
                # those that are not logged would not, so they are kept: the newest half of
                # the bound at most, should they alone fill it (a flood of typing).
                kept = [held for held in self.buffer if held.get("ephemeral")]
                self.buffer = kept[-max(bound // 2, 1) :] if len(kept) >= bound else kept
                self.overflowed = True
                self.newest = None  # the log had the dropped ones; how far is not kept
            self.buffer.append(message)
            return
        self.emit(message["seq"], message["frames"], message.get("eventType", ""))

    async def replay_batches(self) -> AsyncIterator[None]:
        """Emit the logged events after `contiguous` to the sink, one batch at a time.

        Yields after each batch so the transport can drain and pace itself. Live events that
        arrive meanwhile are buffered; if the buffer overflowed, the log is read again.
        """
        from .replay import last_seq, position, read_typed_after

        batch = int(realtime_settings.REPLAY_BATCH)
        # A sink that paces itself on a credit (a socket) says when to stop within a batch:
        # 500 large events could pass the whole credit before the batch ends.
        full = getattr(self.consumer, "replay_full", None)
        while True:
            self.overflowed = False
            while True:
                rows = await _thread(read_typed_after)(self.stream, self.contiguous, batch)
                if not self.authorized:
                    return  # refused while the rows were read: none of them goes out
                metrics.REPLAYED.labels(self.consumer.transport).inc(len(rows))
                hole = False
                for seq, event_type, frames, _timestamp in rows:
                    if seq > self.contiguous + 1:
                        # Rows come in seq order and the log has no hole but the pruned
                        # front, so `contiguous + 1` was pruned after the position was read
                        # (it is never in `above`: that would have moved `contiguous`).
                        hole = True
                        break
                    self.emit(seq, frames, event_type)
                    if full is not None and full():
                        yield
                if not rows:
                    if self.newest is None:
                        # How far the log went is not known: read that, then the log once
                        # more. In this order an event committed after the empty read is
                        # read (or arrives live), not taken for one pruned.
                        self.newest = await _thread(last_seq)(self.stream)
                        if self.newest > self.contiguous:
                            continue
                    # Every seq up to `newest` was committed before this read found none
                    # after `contiguous`: those between were pruned, the last ones too.
                    hole = self.newest > self.contiguous
                if hole:
                    # Lost to this subscriber for good: say so, as a resume the log no
                    # longer covers would have, and go on from the stream's position.
                    now = await _thread(position)(self.stream)
                    if not self.authorized:
                        return  # refused (or unsubscribed) meanwhile: nothing more goes out
                    self._skip_to(now.seq)
                    self.newest = now.seq
                    metrics.RESETS.labels(self.consumer.transport).inc()
                    self.consumer.send_reset(self.stream, now.seq, now.epoch)
                    continue
                yield
                if len(rows) < batch:
                    break
            if not self.overflowed:
                return

    def resync(self) -> None:
        """Read the log again after `contiguous`: live events may have been lost on the way."""
        if not self.authorized:
            return
        self.newest = None  # the log may have gone on past what this subscription knows of
        if self.replaying:
            self.overflowed = True  # the replay under way reads the log once more
            return
        self.replaying = True
        self.consumer.catch_up(self)

    def go_live(self) -> None:
        """End the replay: deliver what arrived meanwhile (deduplicated), then live events."""
        self.replaying = False
        buffered, self.buffer = self.buffer, []
        for message in buffered:
            self.deliver(message)

    def _skip_to(self, seq: int) -> None:
        """Count every seq up to `seq` as done, and then each one above that follows on."""
        contiguous = max(self.contiguous, seq)
        above = self.above
        if isinstance(above, set) and above:
            above.difference_update([s for s in above if s <= contiguous])
            while contiguous + 1 in above:
                contiguous += 1
                above.discard(contiguous)
        self.contiguous = contiguous

    def emit(self, seq: int, frames: dict[str, str], event_type: str = "") -> None:
        if not self.authorized:
            return  # refused while its replay was under way (`deliver` counts live ones)
        if seq <= self.contiguous or seq in self.above:
            return  # already delivered (replay and live overlap, or the relay's duplicate)
        if seq == self.contiguous + 1:
            if self.above:
                self._skip_to(seq)
            else:
                self.contiguous = seq  # the usual case, once per event and subscriber
        else:
            if not isinstance(self.above, set):
                self.above = set()
            self.above.add(seq)
            if len(self.above) > _DUPLICATE_WINDOW and not self.replaying:
                # A seq has been missing for long (its publish failed; the relay sends it
                # later, or never to this node): the log has it, so read the log from here.
                self.resync()
            elif len(self.above) > 4 * _DUPLICATE_WINDOW:  # bounded whatever happens
                logger.warning("%s: giving up on seqs up to %d", self.stream, min(self.above))
                self._skip_to(min(self.above))
        frame = pick_frame(frames, self.version, self.audience)
        self.consumer.send_event(self.stream, seq, event_type, frame)


def _within_cap(policy: Any, text: str, ref: str | None) -> None:
    """Refuse a client event whose data, as JSON in UTF-8, is over the policy's cap."""
    if len(text.encode()) > policy.client_event_max_bytes:
        raise ProtocolError(
            Code.EVENT_NOT_ALLOWED, f"event data over {policy.client_event_max_bytes} bytes", ref
        )


class RealtimeConsumer(AsyncWebsocketConsumer):
    """Authenticated, per-stream authorized, resumable event delivery over one socket."""

    # One instance per socket, tens of thousands per process: its state lives in slots.
    # (Channels' classes have no slots, so a `__dict__` remains, for their `groups` and a
    # subclass's own attributes.) Past 30 attributes in its `__dict__`, CPython gives each
    # instance a dict of its own, 1.6 KiB, instead of values stored in the object
    # (docs/performance.md, idle connections).
    __slots__ = (
        "_reloading",
        "_subscriptions_dirty",
        "_subscriptions_writer",
        "_user_read_applied",
        "_user_reads",
        "acked",
        "announced",
        "auth_hash",
        "authz_due",
        "authz_runs",
        "authz_waiting",
        "base_send",
        "bucket",
        "channel_layer",
        "close_code",
        "closing",
        "connection_id",
        "credit",
        "drained",
        "handling",
        "hub",
        "last_received",
        "malformed",
        "opened_at",
        "outbox",
        "pings",
        "queued",
        "refusals",
        "registered",
        "scope",
        "session",
        "session_key",
        "subscribe_bucket",
        "subscriptions",
        "unacked",
        "user",
        "writer",
    )

    transport = "websocket"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authz_due = float("inf")  # when to decide the subscriptions again unprompted
        self.authz_waiting = False  # a realtime.authz is queued and has not started
        self.authz_runs = 0  # realtime.authz decisions started: a resync's older one must not win
        self.auth_hash: str | None = None  # the user's session auth hash when last checked
        self.announced = False  # the `connected` hooks ran
        self.close_code: int | None = None
        self._reloading: asyncio.Task[bool] | None = None
        self._user_reads = 0  # reads of the user begun
        self._user_read_applied = 0  # the newest of them whose copy `self.user` is
        self._subscriptions_dirty = False
        self._subscriptions_writer: asyncio.Task[None] | None = None

    @property  # type: ignore[override]
    def channel_layer_alias(self) -> str:
        # The layer events travel on (`self.channel_layer`, for hooks and subclasses).
        return str(realtime_settings.CHANNEL_LAYER)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' consumer loop, without a channel-layer channel of the socket's own.

        Events reach the socket through its process's hub, and so do its user's control
        messages (`control`): a channel per socket would cost a Redis subscription, a queue
        and a task each, for nothing. `channel_name` and `groups` are therefore not available.
        """
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        self.handling = asyncio.Lock()
        try:
            with contextlib.suppress(StopConsumer):
                await await_many_dispatch([receive], self.dispatch)
        finally:
            started = getattr(self, "hub", None) is not None
            if started and (
                getattr(self, "registered", False) or getattr(self, "subscriptions", {})
            ):
                # Cancelled (the server gave up waiting for it) before `disconnect` ran or
                # finished: finish it in a task of its own, or the hub, the Connection row and
                # presence would keep this socket for as long as the process runs.
                self.closing = True
                _background(self._disconnect_after_cancel())

    async def _disconnect_after_cancel(self) -> None:
        try:
            await self.disconnect(1006)
        except Exception:  # the loop may be closing (server shutdown): say so, once
            logger.warning("cleanup of cancelled socket %s failed", self.connection_id)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        self.hub = get_hub()  # this loop's; read once, not per frame
        self.connection_id = uuid.uuid4().hex
        self.subscriptions: dict[str, Subscription] = {}
        self.outbox: collections.deque[str] = collections.deque()
        # The writer task runs while there is something to send, and the events of a replay
        # are made when one needs them: an idle socket holds neither. Frames of an event
        # the hub is handing out are sent by the hub itself (`QUEUED`, `flush_queued`).
        self.writer: asyncio.Task[None] | _Queued | None = None
        self.drained: asyncio.Event | None = None
        self.acked: asyncio.Event | None = None
        self.closing = False
        self.malformed = 0
        self.refusals = 0
        self.unacked = 0
        # `queued` counts every character ever queued; each ping notes it (`pings`), and a
        # pong acknowledges what was queued up to the oldest unanswered ping, not everything.
        self.queued = 0
        # A list, not a deque: it holds 16 at most, and an empty deque costs 760 bytes, a
        # list 56 (per socket: docs/performance.md, idle connections).
        self.pings: list[int] = []
        # Read once: enqueue runs for every frame to every subscriber.
        self.credit = int(realtime_settings.MAX_UNACKED_BYTES)
        self.last_received = time.monotonic()
        self.registered = False
        self.user = None
        self.bucket = TokenBucket(realtime_settings.PUBLISH_RATE, realtime_settings.PUBLISH_BURST)
        self.subscribe_bucket = TokenBucket(
            realtime_settings.SUBSCRIBE_RATE, realtime_settings.SUBSCRIBE_BURST
        )

        origin_refusal = self.scope.get("realtime_origin_refused")
        if origin_refusal:
            await self._refuse(Close.FORBIDDEN, "origin not allowed", origin_refusal)
            return
        limit = int(realtime_settings.MAX_CONNECTIONS_PER_USER)
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        client = self.scope.get("client") or ("", 0)
        opened = False
        try:
            user = await self._authenticate()
            signed_in = user is not None and user.is_authenticated and user.is_active
            if signed_in:
                self.user = user
                self.auth_hash = auth_hash(user)  # for a password change later (_reload_user)
                version, address = (query.get("v") or [""])[0], str(client[0] or "")
                writing = _background(_thread(self._open_row)(version, address, limit))
                try:
                    opened = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    # The server gave up on the handshake while the row was written: the
                    # thread goes on, and a row it writes must not count against the user's
                    # limit until the sweep (CONNECTION_SWEEP_AFTER).
                    _background(self._release_unaccepted_row(writing))
                    raise
        except Exception:
            # The database failed (a ticket's redeem, the count or the row): accepted and
            # closed with 4500, as a failure after the accept is. Raised from here, it would
            # reject the handshake, which a browser sees as 1006 with no code to act on.
            # No row was written (its transaction rolled back), so there is none to release.
            logger.exception(
                "connect of %s failed before the accept",
                self.connection_id,
                extra=self._log_extra(),
            )
            await self._refuse(Close.INTERNAL_ERROR, "internal error")
            return
        if not signed_in:
            await self._refuse(Close.UNAUTHENTICATED, "not authenticated")
            return
        if not opened:
            await self._refuse(Close.RATE_LIMITED, f"more than {limit} connections for this user")
            return
        self.registered = True
        metrics.CONNECTS.labels(self.transport).inc()
        if query.get("reconnect") == ["1"]:
            metrics.RECONNECTS.labels(self.transport).inc()
        metrics.CONNECTIONS.labels(self.transport).inc()
        self.authz_due = next_recheck(time.monotonic(), first=True)
        try:
            await self.accept()
            # Accepted first: a logout arriving now can close the socket.
            await self.hub.watch_user(user.pk, self)
            # A logout or deactivation told to the user's group before this socket watched it
            # reached no socket: decide on the user and the session as they are now, once.
            # Before the hub's heartbeat holds the socket, so nothing (a ping) precedes the
            # welcome.
            refusal = await _thread(self._signed_in_now)()
            if refusal is None:
                await self.hub.add_connection(self)
        except Exception:
            # The channel layer failed (or the client left): release the row now, since no
            # disconnect may follow a connect that failed; the client retries after backoff.
            logger.exception("connect of %s failed", self.connection_id, extra=self._log_extra())
            await self.disconnect(Close.INTERNAL_ERROR)
            with contextlib.suppress(Exception):
                await self.close(Close.INTERNAL_ERROR)
            return
        if refusal is not None:
            await self._close(refusal)
            return
        heartbeat = float(realtime_settings.HEARTBEAT)
        self.enqueue(
            protocol.dumps(
                {
                    "op": "welcome",
                    "connectionId": self.connection_id,
                    "protocol": protocol.PROTOCOL,
                    "heartbeat": heartbeat,
                }
            )
        )
        self.announced = True  # `disconnected` is called only after `connected`
        await hooks.call("connected", self)

    async def _release_unaccepted_row(self, writing: asyncio.Task[bool]) -> None:
        from .connections import close_connection

        try:
            opened = await writing
        except Exception:
            return  # nothing written: its transaction rolled back
        if opened:
            await _thread(close_connection)(self.connection_id)

    def _open_row(self, version: str, addr: str, limit: int) -> bool:
        """Write this socket's Connection row unless the user has `limit` rows already."""
        from .connections import count_for_user, open_connection, resolve_tenant

        # A user at the limit (a reconnect storm) is refused without the lock and the tenant
        # lookup. Rows are only added under the lock, so this check never lets one too many in.
        if count_for_user(self.user) >= limit:
            return False
        # Counted again and written in one locked transaction: a burst cannot all pass.
        return open_connection(
            connection_id=self.connection_id,
            user=self.user,
            node=node_id(),
            transport=self.transport,
            client_version=version,
            remote_addr=addr,
            tenant=resolve_tenant(self.user),
            limit=limit,
        )

    async def _authenticate(self) -> Any:
        # Blank values kept: `?ticket=` names a ticket (an empty one, refused), and must not
        # fall back to the session cookie.
        query = parse_qs(
            self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        tickets = query.get("ticket")
        self.opened_at = time.time()
        if tickets is not None:
            from .tickets import redeem

            self.session, self.session_key = None, None
            return await _thread(redeem)(tickets[0])
        self.session = self.scope.get("session")
        self.session_key = getattr(self.session, "session_key", None)
        return self.scope.get("user")

    def _log_extra(self, stream: str | None = None) -> dict[str, Any]:
        """Fields for structured logs (realtime.logs.JSONFormatter)."""
        extra: dict[str, Any] = {"connection": getattr(self, "connection_id", None)}
        user = getattr(self, "user", None)
        if user is not None:
            extra["user"] = user.pk
        if stream is not None:
            extra["stream"] = stream
        return extra

    async def _refuse(self, code: int, reason: str, detail: str = "") -> None:
        headers = dict(self.scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1")
        logger.warning(
            "websocket refused (%d %s) origin=%r path=%r %s",
            code,
            reason,
            origin,
            self.scope.get("path"),
            detail,
            extra=self._log_extra(),
        )
        metrics.REFUSED.labels(str(code)).inc()
        # Frames the client sends during the close handshake are not handled (a socket over
        # the connection limit has a user already, but may not subscribe or publish).
        self.closing = True
        # Accept first: a browser cannot read a refused handshake's status, only a close code.
        await self.accept()
        await self.close(code)

    # -- inbound --------------------------------------------------------------------------

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' dispatch first closes stale database connections on its sync thread: a
        # thread hop for every frame and control message, pongs included, queued behind the
        # handshakes' session reads. Every database call here goes through `_thread`, which
        # does that cleanup itself around the call.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        async with self.handling:  # frames and control messages one at a time (see `control`)
            await handler(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing or self.user is None:
            return
        self.last_received = time.monotonic()
        try:
            if text_data is None:
                too_big = len(bytes_data or b"") > realtime_settings.MAX_FRAME_BYTES
                if too_big:
                    raise ProtocolError(Code.TOO_LARGE, "frame too large")
                raise ProtocolError(Code.BINARY_NOT_SUPPORTED, "send JSON text frames")
            frame = protocol.parse(
                text_data,
                max_bytes=int(realtime_settings.MAX_FRAME_BYTES),
                max_depth=int(realtime_settings.MAX_DEPTH),
            )
            await self._handle(frame)
        except ProtocolError as exc:
            await self._protocol_error(exc)
        except Exception:
            logger.exception(
                "error handling a frame on %s", self.connection_id, extra=self._log_extra()
            )
            self.enqueue(protocol.error(None, Code.INTERNAL_ERROR, "internal error"))

    async def _protocol_error(self, exc: ProtocolError) -> None:
        reason = metrics.DROP_REASONS.get(exc.code)
        if reason is not None:
            metrics.DROPPED.labels(reason).inc()
        self.enqueue(protocol.error(exc.ref, exc.code, exc.message))
        if exc.code == Code.TOO_LARGE:
            await self._close(Close.TOO_LARGE)
            return
        if exc.code in (Code.FORBIDDEN, Code.RATE_LIMITED, Code.EVENT_NOT_ALLOWED):
            self.refusals += 1
            if self.refusals > realtime_settings.ABUSE_LIMIT:
                await self._close(Close.RATE_LIMITED)
            return
        if exc.code in (
            Code.INVALID_JSON,
            Code.BINARY_NOT_SUPPORTED,
            Code.TOO_DEEP,
            Code.UNKNOWN_OP,
            Code.INVALID_FRAME,
            Code.INVALID_STREAM,
            Code.UNSUPPORTED_VERSION,
        ):
            self.malformed += 1
            if self.malformed > realtime_settings.MALFORMED_LIMIT:
                await self._close(Close.MALFORMED)

    async def _handle(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.Ping):
            self.enqueue(protocol.dumps({"op": "pong", "ref": frame.ref}))
        elif isinstance(frame, protocol.Pong):
            if self.pings:  # pongs answer pings in order: this one, the oldest unanswered
                self.unacked = min(self.unacked, self.queued - self.pings.pop(0))
            if self.acked is not None:
                self.acked.set()
        elif isinstance(frame, protocol.Subscribe):
            if not self.subscribe_bucket.take():
                # Answered, not counted as abuse: a page that shows many streams (or several
                # tabs sharing this socket) may simply come back for them too fast.
                metrics.DROPPED.labels("rate_limit").inc()
                self.enqueue(
                    protocol.error(frame.ref, Code.RATE_LIMITED, "too many subscribes; retry later")
                )
                return
            await self._subscribe(frame)
        elif isinstance(frame, protocol.Unsubscribe):
            await self._unsubscribe(frame)
        elif isinstance(frame, protocol.Publish):
            await self._publish(frame)

    def _policy(self, stream: str, ref: str | None) -> StreamPolicy:
        kind, _key = parse_stream(stream)
        policy = stream_kinds.get(kind)
        if policy is None:
            raise ProtocolError(Code.UNKNOWN_STREAM, f"no stream kind {kind!r}", ref)
        return policy

    async def _access(
        self, policy: StreamPolicy, stream: str, *, audience: bool = True
    ) -> str | None:
        """None if refused, else the audience this socket gets on `stream` ("": the default
        payload, and always so without `audience`, which skips deciding it)."""
        kind, key = parse_stream(stream)
        try:
            if not audience:
                return "" if await _thread(policy.check)(self.user, kind, key) else None
            return await _thread(policy.access)(self.user, kind, key)
        except Exception:
            logger.exception("policy for %s raised; refusing", stream)
            return None

    async def _subscribe(self, frame: protocol.Subscribe) -> None:
        from .replay import position

        if frame.stream in self.subscriptions:
            raise ProtocolError(Code.ALREADY_SUBSCRIBED, "already subscribed", frame.ref)
        if len(self.subscriptions) >= realtime_settings.MAX_SUBSCRIPTIONS:
            raise ProtocolError(
                Code.TOO_MANY_SUBSCRIPTIONS,
                f"at most {realtime_settings.MAX_SUBSCRIPTIONS} subscriptions per connection",
                frame.ref,
            )
        policy = self._policy(frame.stream, frame.ref)
        audience = await self._access(policy, frame.stream)
        if audience is None:
            # Missing objects get the same answer, so existence does not leak.
            metrics.UNAUTHORIZED.labels("subscribe").inc()
            raise ProtocolError(Code.FORBIDDEN, "not allowed", frame.ref)
        subscription = Subscription(self, frame.stream, policy, frame.version, audience)
        self.subscriptions[frame.stream] = subscription
        try:
            await self.hub.join(frame.stream, subscription)
            # Joined first, then read: whatever commits from here on is either in the log
            # read below or arrives live (buffered until the replay is done), never neither.
            pos = await _thread(position)(frame.stream)
        except Exception:
            # The layer or the database failed: undo, so that the client may try again (a
            # subscription left behind would buffer for ever and refuse the retry).
            logger.exception(
                "subscribe to %s failed on %s",
                frame.stream,
                self.connection_id,
                extra=self._log_extra(frame.stream),
            )
            if self.subscriptions.get(frame.stream) is subscription:
                del self.subscriptions[frame.stream]
            subscription.authorized = False
            await self.hub.leave(frame.stream, subscription)
            raise ProtocolError(Code.INTERNAL_ERROR, "internal error; retry", frame.ref) from None
        recovered = frame.since is not None and pos.covers(frame.since, frame.epoch)
        if frame.since is not None:
            metrics.RESUMES.labels(self.transport).inc()
            if not recovered:
                metrics.RESETS.labels(self.transport).inc()
        subscription.contiguous = frame.since if recovered and frame.since is not None else pos.seq
        subscription.newest = pos.seq  # committed before the replay reads: an empty read is a hole
        data: dict[str, Any] = {"seq": pos.seq, "epoch": pos.epoch, "recovered": recovered}
        for extra in await hooks.call("subscribed", self, frame.stream, policy):
            if extra:
                data.update(extra)
        if self.subscriptions.get(frame.stream) is not subscription:
            return  # closed or revoked while the hooks ran
        self.enqueue(protocol.reply(frame.ref, data))
        self._save_subscriptions()
        # Replay in a task of its own, so this socket's other frames (pongs, above all) are
        # read while a long history streams out.
        subscription.task = asyncio.get_running_loop().create_task(
            self._catch_up(subscription, replay=recovered)
        )

    def catch_up(self, subscription: Subscription) -> None:
        """Replay the log into a live subscription again (the hub found the layer stalled)."""
        if self.closing or self.subscriptions.get(subscription.stream) is not subscription:
            return
        subscription.task = asyncio.get_running_loop().create_task(self._resync(subscription))

    async def _resync(self, subscription: Subscription) -> None:
        # A permission change announced while the layer was silent was lost with it: ask the
        # policy again (about the user as stored now) before replaying, and revoke as a
        # permission change would.
        try:
            # Taken before the read: a decision begun while it ran (on a newer read) holds.
            runs = self.authz_runs
            if not await self._reload_user_once():
                return
            audience = await self._access(subscription.policy, subscription.stream)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The subscription is replaying (buffering) and would never go live again: close,
            # and the client resumes by `since`.
            logger.exception("resync of %s failed on %s", subscription.stream, self.connection_id)
            await self._close(Close.INTERNAL_ERROR)
            return
        if audience is not None:
            if self.authz_runs == runs:  # else a decision begun since, on newer state, holds
                subscription.audience = audience or None
        else:
            subscription.task = None  # this task: realtime_authz must not cancel it
            async with self.handling:  # between frames, as any decision is made
                if not self.closing:
                    await self.realtime_authz({})
            if self.closing or self.subscriptions.get(subscription.stream) is not subscription:
                return
            # Allowed again by the time the decision ran: it is still replaying, so replay.
            subscription.task = asyncio.current_task()
        await self._catch_up(subscription, replay=True)

    async def _catch_up(self, subscription: Subscription, *, replay: bool) -> None:
        try:
            # `overflowed` here: the buffer filled, or a resync came, before the replay.
            if replay or subscription.overflowed:
                async for _batch in subscription.replay_batches():
                    # Let the writer catch up, and wait for the client's pong past half the
                    # credit, so a long history never outruns a reading client.
                    if not await self._drain() or not await self._credit():
                        return
            subscription.go_live()
            if subscription.task is asyncio.current_task():
                subscription.task = None  # done: an idle subscription keeps no finished task
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception(
                "replay of %s failed on %s",
                subscription.stream,
                self.connection_id,
                extra=self._log_extra(subscription.stream),
            )
            await self._close(Close.INTERNAL_ERROR)

    async def _unsubscribe(self, frame: protocol.Unsubscribe) -> None:
        subscription = self.subscriptions.pop(frame.stream, None)
        if subscription is None:
            raise ProtocolError(Code.NOT_SUBSCRIBED, "not subscribed", frame.ref)
        subscription.authorized = False
        if subscription.task is not None:
            subscription.task.cancel()
        await self.hub.leave(frame.stream, subscription)
        await hooks.call("unsubscribed", self, frame.stream, subscription.policy, "unsubscribe")
        self.enqueue(protocol.reply(frame.ref))
        self._save_subscriptions()

    async def _publish(self, frame: protocol.Publish) -> None:
        # The buckets first, as for a subscribe: every publish costs a token, whatever its
        # answer. Refused before them, publishes to an unknown kind (no abuse either) went
        # unlimited, as fast as the socket carried frames, for ever.
        if not self.bucket.take():
            raise ProtocolError(Code.RATE_LIMITED, "too many events; slow down", frame.ref)
        if not await take_user_token(self.user.pk):  # type: ignore[union-attr]
            self.bucket.give_back()  # refused all the same: it costs this socket nothing
            raise ProtocolError(Code.RATE_LIMITED, "too many events; slow down", frame.ref)
        policy = self._policy(frame.stream, frame.ref)
        if not policy.allows_client_event(frame.type):
            # A type clients may not send here, such as a server event (`v1:item.deleted`)
            # forged: an attempt at what only the server may do, counted as a refused one.
            metrics.UNAUTHORIZED.labels("publish").inc()
            raise ProtocolError(Code.EVENT_NOT_ALLOWED, "event type not allowed here", frame.ref)
        _within_cap(policy, protocol.dumps(frame.data), frame.ref)
        if await self._access(policy, frame.stream, audience=False) is None:
            metrics.UNAUTHORIZED.labels("publish").inc()
            raise ProtocolError(Code.FORBIDDEN, "not allowed", frame.ref)
        try:
            data = policy.clean_client_event(self.user, frame.stream, frame.type, frame.data)
        except ValueError as exc:
            message = str(exc)[:200] or "event data refused"
            raise ProtocolError(Code.EVENT_NOT_ALLOWED, message, frame.ref) from None
        except Exception:
            logger.exception("%s.clean_client_event failed", type(policy).__name__)
            raise ProtocolError(Code.INTERNAL_ERROR, "internal error", frame.ref) from None
        if data is not frame.data:  # what the policy made is sent on: JSON, within the cap
            try:
                text = protocol.dumps(data)
            except (TypeError, ValueError):
                logger.exception("%s.clean_client_event returned no JSON", type(policy).__name__)
                raise ProtocolError(Code.INTERNAL_ERROR, "internal error", frame.ref) from None
            _within_cap(policy, text, frame.ref)
        passed = await hooks.publishing(self, frame.stream, policy, frame.type, data)
        if passed is None:  # held back by a hook (typing throttled): accepted, not sent on
            self.enqueue(protocol.reply(frame.ref, {"throttled": True}))
            self.refusals = 0
            return
        try:
            event_id = await hooks.send_ephemeral(
                frame.stream,
                frame.type,
                passed["data"],
                origin=self.connection_id,
                origin_user=self.user.pk,  # type: ignore[union-attr]
                sender={"user": self.user.pk, "connectionId": self.connection_id},  # type: ignore[union-attr]
            )
        except Exception as exc:  # the layer is down or stuck: say so to this frame
            logger.warning(
                "client event on %s not sent (%s: %s)",
                frame.stream,
                type(exc).__name__,
                exc,
                extra=self._log_extra(),
            )
            raise ProtocolError(
                Code.INTERNAL_ERROR, "event not sent; try again later", frame.ref
            ) from None
        self.enqueue(protocol.reply(frame.ref, {"eventId": event_id}))
        # Only an accepted publish forgives earlier refusals: a client cannot clear its count
        # with frames that cost it nothing, and malformed frames count for the socket's life.
        self.refusals = 0

    # -- outbound -------------------------------------------------------------------------

    def send_event(self, stream: str, seq: int, event_type: str, frame: str) -> None:
        self.enqueue(frame)

    def send_reset(self, stream: str, seq: int, epoch: str | None) -> None:
        self.enqueue(protocol.dumps({"op": "reset", "stream": stream, "epoch": epoch, "seq": seq}))

    def send_ephemeral(self, stream: str, event_type: str, frame: str) -> None:
        self.enqueue(frame)

    def enqueue(self, text: str) -> None:
        """Queue a frame for this socket; never awaits, so the hub never waits for a client."""
        if self.closing:
            return
        self.outbox.append(text)
        if self.drained is not None:
            self.drained.clear()
        self.unacked += len(text)
        self.queued += len(text)
        # Over the credit, unless little was outstanding before this frame: one frame larger
        # than the whole credit must still reach a client that reads, or it could never be
        # delivered (a resume would replay it into the same close). Bounded all the same:
        # half the credit, this frame, and the next frame closes.
        if self.unacked > self.credit and self.unacked - len(text) > self.credit // 2:
            logger.warning("slow consumer %s: closing", self.connection_id, extra=self._log_extra())
            metrics.DROPPED.labels("slow_consumer").inc(len(self.outbox) + 1)
            self.closing = True
            self.outbox.clear()
            _background(self._close(Close.SLOW_CONSUMER, force=True))
            return
        if self.unacked > self.credit:
            # Let through over the credit: a ping right behind it, or a pong to an older
            # ping would leave the count over the credit and the next frame would close.
            self._ping()
        elif self.unacked > self.credit // 2 and not self.pings:
            # Ask for a pong early: a reading client answers, a stuck one runs out of credit.
            self._ping()
        self._wake_writer()

    def _ping(self) -> None:
        # Noted: the pong that answers it acknowledges what was queued up to it. A client
        # that sends frames but no pongs stays alive; past 16 unanswered pings no more are
        # noted, so a late pong acknowledges less than it could, never more.
        self.outbox.append(_PING)
        self.unacked += len(_PING)
        self.queued += len(_PING)
        if len(self.pings) < 16:
            self.pings.append(self.queued)

    def _wake_writer(self) -> None:
        writer = self.writer
        batch = self.hub.batch
        if writer is QUEUED and batch is None:
            writer = None  # a batch that was never flushed: do not wait for it forever
        if writer is None or writer.done():
            if batch is not None:  # the hub is handing out an event: it sends after that
                self.writer = QUEUED
                batch.append(self)
            else:
                self.writer = asyncio.get_running_loop().create_task(self._write())

    def flush_queued(self) -> None:
        """Send the queued frames now, from the hub, without a task (see `_Resumed`).

        Each send runs in a copy of the context, as it would in a task of its own, so it
        neither sees nor changes the hub's context variables.
        """
        if self.writer is not QUEUED:
            return
        context = contextvars.copy_context()
        send = _frames_to(self.base_send)
        try:
            while self.outbox:
                coro = send({"type": "websocket.send", "text": self.outbox.popleft()})
                try:
                    yielded = context.run(coro.send, None)
                except StopIteration:
                    continue
                # The server made this send wait: a task of the socket's own finishes it
                # and what is queued behind it, and the hub goes on to the next socket.
                self.writer = asyncio.get_running_loop().create_task(
                    self._write(_Resumed(coro, yielded)), context=context
                )
                return
            if self.drained is not None:
                self.drained.set()
        except (Exception, asyncio.CancelledError):
            # The server refused the frame: this socket cannot go on in order. Close it;
            # the client resumes from its last seq.
            logger.warning("sending to %s failed: closing", self.connection_id, exc_info=True)
            self.outbox.clear()
            self.closing = True
            _background(self._close(Close.INTERNAL_ERROR, force=True))
        finally:
            if self.writer is QUEUED:
                self.writer = None

    async def _write(self, started: _Resumed | None = None) -> None:
        # Frames queued while a send is awaited are sent by this same task, in order.
        if started is not None:
            await started
        send = _frames_to(self.base_send)
        while self.outbox:
            await send({"type": "websocket.send", "text": self.outbox.popleft()})
        if self.drained is not None:
            self.drained.set()
        self.writer = None  # done: nothing awaits from here on

    def replay_full(self) -> bool:
        """Whether a replay should wait for the client before queuing more (half the credit)."""
        return self.unacked > self.credit // 2

    async def _credit(self) -> bool:
        """Wait until the client has acknowledged enough of what it was sent (replay pacing).

        Returns False (and closes as a slow consumer) if it does not answer a ping in time.
        """
        limit = self.credit
        while self.unacked > limit // 2 and not self.closing:
            if self.acked is None:
                self.acked = asyncio.Event()
            self.acked.clear()
            if not self.pings:
                self._ping()
                self._wake_writer()
            try:
                async with asyncio.timeout(2 * float(realtime_settings.HEARTBEAT)):
                    await self.acked.wait()
            except TimeoutError:
                await self._close(Close.SLOW_CONSUMER, force=True)
                return False
        return not self.closing

    async def _drain(self) -> bool:
        """Let the writer catch up during a long replay, so the outbox stays small.

        Waits as long as frames keep leaving; returns False (and closes as a slow consumer)
        if none left for a whole heartbeat interval.
        """
        if self.drained is None:
            self.drained = asyncio.Event()  # set by the writer running now, once it is done
        while self.outbox and not self.closing:
            left = len(self.outbox)
            try:
                async with asyncio.timeout(float(realtime_settings.HEARTBEAT)):
                    await self.drained.wait()
            except TimeoutError:
                if len(self.outbox) < left:
                    continue  # a slow link, but moving
                logger.warning(
                    "slow consumer %s: nothing sent for a heartbeat during a replay; closing",
                    self.connection_id,
                    extra=self._log_extra(),
                )
                metrics.DROPPED.labels("slow_consumer").inc(len(self.outbox))
                await self._close(Close.SLOW_CONSUMER, force=True)
                return False
        return not self.closing

    def heartbeat(self, now: float) -> None:
        """From the hub, once per HEARTBEAT: a ping, or 4408 after two silent intervals."""
        interval = float(realtime_settings.HEARTBEAT)
        if now - self.last_received > 2 * interval:
            if not self.closing:
                logger.info("heartbeat timeout on %s", self.connection_id, extra=self._log_extra())
                # force: a silent client is not waited for, and no other sender is raced
                _background(self._close(Close.HEARTBEAT_TIMEOUT, force=True))
            return
        if self.closing:
            return
        self._ping()
        self._wake_writer()
        if now >= self.authz_due:
            # Decide again unprompted now and then: a permission change whose message the
            # channel layer lost would otherwise never reach this socket.
            self.authz_due = next_recheck(now)
            # Even with no subscription: a user deactivated by queryset.update() is closed.
            self.control({"type": "realtime.authz"})

    async def _close(self, code: int, *, force: bool = False) -> None:
        if self.closing and not force:
            return
        self.closing = True
        self.close_code = code
        # Flush what is queued (error replies) before the close frame.
        if not force:
            while self.outbox:
                await self.send(text_data=self.outbox.popleft())
        try:
            await self.close(code)
        except Exception:
            # Refused (a server that does not send this code) or the socket is gone: close
            # plainly, or this socket would stay `closing`, answering nothing and never pinged.
            logger.warning("close %s of %s refused; closing with 1000", code, self.connection_id)
            with contextlib.suppress(Exception):
                await self.close(Close.NORMAL)

    # -- control messages (channel layer) ----------------------------------------------

    #: Message types of the user's control group that this consumer handles (a subclass may
    #: add its own, with a `realtime_<name>` handler).
    control_types = frozenset({"realtime.authz", "realtime.logout", "realtime.disconnect"})

    def control(self, message: dict[str, Any]) -> None:
        """A control message of this socket's user, from the hub.

        Handled in a task of its own that waits its turn between the socket's frames, as
        Channels would have run it had it come on a channel of the socket's own.
        """
        if message.get("type") not in self.control_types or self.closing:
            return
        if message["type"] == "realtime.authz":
            if self.authz_waiting:
                return  # one still waiting to start reads the permissions after this change too
            self.authz_waiting = True
        _background(self._controlled(message))

    async def _controlled(self, message: dict[str, Any]) -> None:
        async with self.handling:
            if message["type"] == "realtime.authz":
                self.authz_waiting = False
            if not self.closing:
                await getattr(self, get_handler_name(message))(message)

    def _signed_in_now(self) -> int | None:
        """The close code this socket gets if its user or session ended meanwhile, else None
        (in one thread hop: it runs in every handshake)."""
        from .policies import reload_user

        user = reload_user(self.user)
        if user is None or not user.is_active:
            return Close.UNAUTHENTICATED
        if not same_password(user, self.auth_hash):
            return Close.DISCONNECTED
        if signed_out(self.session, self.session_key, user, self.opened_at):
            return Close.DISCONNECTED if self.session is not None else Close.UNAUTHENTICATED
        # `self.user` stays the one the handshake read ms ago: the scope holds it anyway, and a
        # second copy per socket would cost idle memory (the 40 KiB per connection budget).
        return None

    async def _reload_user_once(self) -> bool:
        """`_reload_user`, shared by the resyncs that wait for it at the same time.

        A stalled layer that answers again resyncs every subscription at once: each reading
        the user on its own would cost a user and a session query per subscription. The
        ones that come while a read is under way take its answer; a later one reads anew.
        """
        reloading = self._reloading
        if reloading is None or reloading.done():
            reloading = asyncio.get_running_loop().create_task(self._reload_user())
            self._reloading = reloading
            reloading.add_done_callback(self._reloaded)
        # Shielded: an unsubscribe cancels its own resync, not the read the others wait for.
        return await asyncio.shield(reloading)

    def _reloaded(self, task: asyncio.Task[bool]) -> None:
        if self._reloading is task:
            self._reloading = None
        if not task.cancelled():
            task.exception()  # retrieved: every resync that awaited it logs it itself

    async def _reload_user(self) -> bool:
        """Read this socket's user again (is_active, is_superuser, …); close if it is gone."""
        from .policies import reload_user

        self._user_reads += 1
        read = self._user_reads
        user = await _thread(reload_user)(self.user)
        if user is None or not user.is_active:
            await self._close(Close.UNAUTHENTICATED)
            return False
        if not same_password(user, self.auth_hash):
            # The password changed: a session authenticated before is no longer one (Django
            # decides so on its next request). Closed with a code the client reconnects
            # after: the handshake then decides on the cookie as it is now, so the tab that
            # changed the password (its session was given the new hash) comes back and the
            # others get 4401. A ticket client fetches a new ticket.
            await self._close(Close.DISCONNECTED)
            return False
        if await _thread(signed_out)(self.session, self.session_key, user, self.opened_at):
            # Logged out with the logout message lost, or signed in again (login() cycles the
            # session key). A session socket cannot tell which, so it reconnects (4000) and
            # the handshake decides on the cookie as it is now (4401 after a logout); a ticket
            # socket is told for good.
            code = Close.DISCONNECTED if self.session is not None else Close.UNAUTHENTICATED
            await self._close(code)
            return False
        if read > self._user_read_applied:  # else a read begun later has answered already
            self.user = user
            self._user_read_applied = read
        return True

    async def realtime_authz(self, message: dict[str, Any]) -> None:
        """Permissions of this user changed somewhere: decide every subscription again."""
        self.authz_runs += 1
        if not await self._reload_user():
            return
        current = dict(self.subscriptions)
        # All of them in one worker thread, the streams of one kind together (a few queries
        # for a page's hundred project streams, not three each), each under the policy it
        # was subscribed under.
        policies = {stream: subscription.policy for stream, subscription in current.items()}
        decided = await _thread(streams_access)(self.user, list(current), policies)
        # Every decision takes effect before the first await: a refused stream must not go
        # on receiving while the leave of another one (a Redis round trip) is awaited.
        ended = []
        for stream, subscription in current.items():
            if self.subscriptions.get(stream) is not subscription:
                continue  # unsubscribed meanwhile (or closed): the decision is not about it
            refused, audience = decided[stream]
            if refused is None:
                subscription.authorized = True
                subscription.audience = audience or None
                continue
            subscription.authorized = False
            self.subscriptions.pop(stream, None)
            if subscription.task is not None:
                subscription.task.cancel()
            self.enqueue(
                protocol.dumps({"op": "unsubscribed", "stream": stream, "reason": Code.FORBIDDEN})
            )
            ended.append((stream, subscription))
        for stream, subscription in ended:
            await self.hub.leave(stream, subscription)
            await hooks.call("unsubscribed", self, stream, subscription.policy, "forbidden")
        self._save_subscriptions()

    async def realtime_logout(self, message: dict[str, Any]) -> None:
        await self._close(Close.UNAUTHENTICATED)

    async def realtime_disconnect(self, message: dict[str, Any]) -> None:
        if not message.get("connection") or message["connection"] == self.connection_id:
            await self._close(int(message.get("code", Close.DISCONNECTED)))

    # -- teardown -------------------------------------------------------------------------

    def _save_subscriptions(self) -> None:
        # One writer per connection, always writing the latest list: two writes on two
        # worker threads could otherwise land in the wrong order.
        self._subscriptions_dirty = True
        if self._subscriptions_writer is None or self._subscriptions_writer.done():
            self._subscriptions_writer = asyncio.get_running_loop().create_task(
                self._write_subscriptions()
            )

    async def _write_subscriptions(self) -> None:
        from .connections import set_subscriptions

        while self._subscriptions_dirty and self.registered:
            self._subscriptions_dirty = False
            try:
                await _thread(set_subscriptions)(self.connection_id, sorted(self.subscriptions))
            except Exception:
                logger.warning("recording subscriptions of %s failed", self.connection_id)
        self._subscriptions_writer = None  # done: an idle socket keeps no finished task

    async def disconnect(self, code: int) -> None:
        self.closing = True
        registered, self.registered = self.registered, False  # once, if called again
        if registered:
            metrics.CONNECTIONS.labels(self.transport).dec()
            # The code this server closed with, else the one the client (or network) gave.
            metrics.DISCONNECTS.labels(str(self.close_code or code)).inc()
        hub = self.hub
        hub.remove_connection(self)
        try:
            ending = list(self.subscriptions.items())
            for _stream, subscription in ending:
                if subscription.task is not None:
                    subscription.task.cancel()
            # At once: with a stuck layer each leave waits up to GROUP_TIMEOUT, and one after
            # the other they would outlast the server's wait for this coroutine.
            await asyncio.gather(
                *(hub.leave(stream, subscription) for stream, subscription in ending),
                return_exceptions=True,
            )
            # The hooks of all subscriptions at once: each may wait up to PUBLISH_TIMEOUT for
            # an announcement (presence) when the layer is stuck, and one after the other they
            # would outlast the server's wait for this coroutine and be cut off.
            turns = asyncio.Semaphore(32)

            async def unsubscribed(stream: str, subscription: Subscription) -> None:
                async with turns:
                    await hooks.call(
                        "unsubscribed", self, stream, subscription.policy, "disconnect"
                    )
                # Done: a disconnect finished after this one was cut off does not call it again.
                if self.subscriptions.get(stream) is subscription:
                    del self.subscriptions[stream]

            await asyncio.gather(*(unsubscribed(stream, sub) for stream, sub in ending))
            self.subscriptions.clear()
            if self.user is not None and registered and self.announced:
                await hooks.call("disconnected", self)
            if self.writer is not None:
                self.writer.cancel()
        finally:
            # Whatever failed above, the row goes: a row left behind would count against
            # the user's connection limit for as long as this node runs.
            if self.user is not None and registered:
                release = _background(release_user(hub, self.user.pk, self, self.connection_id))
                await asyncio.shield(release)
