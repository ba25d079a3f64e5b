"""Presence on the WebSocket and SSE: realtime connection hooks that keep the backend's entries.

A subscription to a stream whose policy has `presence = True` is an entry (stream, user,
connection). The backend reports a user's first entry (a join) and last one (a leave); only
those are announced to the stream as `v1:presence.joined` / `v1:presence.left` events (not
logged, no `seq`), so a second tab, a heartbeat or a refresh announces nothing. Each event loop
refreshes its entries every REFRESH_INTERVAL and sweeps expired ones every SWEEP_INTERVAL; a
node that dies stops refreshing, and a sweeper on any node removes its entries after the TTL
and announces each leave once (the backend's atomic removal decides who announces).

Typing indicators pass through `publishing`: `v1:typing.started` is forwarded at most once
per TYPING_INTERVAL per user and stream (per node), with `expiresIn` added, and
`v1:typing.stopped` only once after each forwarded `started`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.utils.module_loading import import_string

from realtime.events import format_timestamp
from realtime.hooks import ConnectionHooks, send_ephemeral
from realtime.policies import stream_kinds
from realtime.streams import parse_stream

from .backends import Change, PresenceBackend
from .conf import presence_settings
from .display import display_many, serializer, user_id
from .signals import presence_joined, presence_left

logger = logging.getLogger("presence")

JOINED = "v1:presence.joined"
LEFT = "v1:presence.left"
TYPING_STARTED = "v1:typing.started"
TYPING_STOPPED = "v1:typing.stopped"
_TYPING_MEMORY = 10_000
_UNSURE_MEMORY = 1_000
#: Seconds a loop's joins and leaves leave the backend alone after one of its calls failed.
_REST = 5.0
#: A refresh writes every entry of the loop: it may take this many times BACKEND_TIMEOUT.
_REFRESH_TIMEOUT_FACTOR = 5.0
_background_tasks: set[asyncio.Task[Any]] = set()


class BackendResting(Exception):
    """The presence backend failed moments ago: this loop does not ask it again yet."""


def _thread(func: Any) -> Any:
    return database_sync_to_async(func, thread_sensitive=False)


def iso(seconds: float) -> str:
    return format_timestamp(dt.datetime.fromtimestamp(seconds, dt.UTC))


_backend: PresenceBackend | None = None
_backend_config: tuple[Any, ...] | None = None


def get_backend() -> PresenceBackend:
    """The configured backend (one instance, rebuilt when PRESENCE changes)."""
    global _backend, _backend_config
    config = (presence_settings.BACKEND, tuple(sorted((presence_settings.CONFIG or {}).items())))
    if _backend is None or config != _backend_config:
        cls = import_string(presence_settings.BACKEND)
        _backend = cls(**(presence_settings.CONFIG or {}))
        _backend_config = config
    return _backend


def _ttl() -> float:
    return float(presence_settings.TTL)


def _refresh_interval() -> float:
    configured = presence_settings.REFRESH_INTERVAL
    return float(configured) if configured else _ttl() / 3


def _node() -> str:
    from realtime.fanout import node_id

    return node_id()


def _gone(connection: Any) -> bool:
    return bool(getattr(connection, "closing", False))


def presence_enabled(stream: str) -> bool:
    kind, _key = parse_stream(stream)
    policy = stream_kinds.get(kind)
    return bool(policy is not None and policy.presence)


async def member_list(stream: str, include: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """The stream's present users, oldest first, at most MAX_LISTED of them, and how many
    there are in all: ([{"user": {...}, "since": "..."}], total).

    The user `include` (the one asking, if present) is listed even past the bound, in place
    of the newest of the others: a client shows itself from this list.
    """
    members = await get_backend().members(stream)
    limit = max(0, int(presence_settings.MAX_LISTED))
    ordered = sorted(members.items(), key=lambda item: (item[1], item[0]))
    if include in members and limit and include not in dict(ordered[:limit]):
        ordered = [*ordered[: limit - 1], (include, members[include])]
    ordered = ordered[:limit]
    shown = await _thread(display_many)([user_id for user_id, _since in ordered])
    listed = [
        {"user": shown[user_id], "since": iso(since)}
        for user_id, since in ordered
        if user_id in shown
    ]
    return listed, len(members)


async def _signal(signal: Any, stream: str, user_id: str, **kwargs: Any) -> None:
    kind, _key = parse_stream(stream)
    sender = type(stream_kinds.get(kind))
    for receiver, result in await _thread(signal.send_robust)(
        sender=sender, stream=stream, user_id=user_id, **kwargs
    ):
        if isinstance(result, Exception):
            logger.error("presence signal receiver %r raised %r", receiver, result)


async def _announce(stream: str, event_type: str, data: Any, **kwargs: Any) -> None:
    # A join or leave is written whether or not its announcement goes out: a layer that is
    # down or stuck (PUBLISH_TIMEOUT) costs the announcement, never the join or the leave.
    try:
        await send_ephemeral(stream, event_type, data, **kwargs)
    except Exception as exc:
        logger.warning(
            "presence %s on %s not announced (%s: %s)", event_type, stream, type(exc).__name__, exc
        )


async def announce_left(change: Change, reason: str) -> None:
    data: dict[str, Any] = {"user": {"id": user_id(change.user_id)}, "reason": reason}
    if change.since > 0:
        # The presence this ends, as its `joined` (or the member list) gave it: announcements
        # from other sockets or nodes may arrive out of order, and a client drops a `left`
        # that ends an older presence than the one it shows.
        data["since"] = iso(change.since)
    await _announce(change.stream, LEFT, data)
    await _signal(presence_left, change.stream, change.user_id, reason=reason)


async def sweep(now: float | None = None) -> list[Change]:
    """Expire entries whose node stopped refreshing; announce each leave (once, cluster-wide)."""
    left = await get_backend().expire(time.time() if now is None else now)
    for change in left:
        await announce_left(change, "expired")
    return left


@dataclass
class _LoopState:
    """What one event loop (one server process, usually) holds."""

    #: (stream, user id, connection id) -> the connection (consumer) it is for
    entries: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    #: (stream, user id) -> (when its last `started` was forwarded, not stopped since)
    typing: dict[tuple[str, str], tuple[float, bool]] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The `now` of each join this loop wrote without learning whether it made the user
    #: present (the backend raised: Redis may have run it and lost the reply). A presence
    #: whose `since` is one of them was never announced; the next refresh looks for them.
    unsure: list[float] = field(default_factory=list)
    #: (stream, user id) -> since: presences known to be new and not announced yet.
    unannounced: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Entries whose leave raised (it may have run): the next refresh makes them expire at
    #: once, until `deadline` (after which a sweep may have taken them, so one would be
    #: added back). Entry -> deadline.
    leaving: dict[tuple[str, str, str], float] = field(default_factory=dict)
    #: When the last refresh wrote every entry (at first, when this state began): no entry
    #: of this loop expires before this plus the TTL.
    written: float = field(default_factory=time.time)
    #: Until when (monotonic) joins and leaves do not call the backend: one failed.
    resting_until: float = 0.0
    #: Entries whose join did not call the backend (it was resting): the next refresh writes
    #: them; one that leaves first has nothing there to undo.
    unwritten: set[tuple[str, str, str]] = field(default_factory=set)
    #: Held while `entries` changes together with the backend, and by a refresh from the
    #: moment it reads `entries` until its writes are done. Without it, a leave landing
    #: while a refresh is on its way is undone by the refresh's write of that entry (the
    #: user shows as present again), and a join landing first is announced by the refresh.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PresenceTracker(ConnectionHooks):
    """The realtime hooks of the presence app (registered in `PresenceConfig.ready`)."""

    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    def state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            for closed in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[closed]
            state = self._loops[loop] = _LoopState()
            state.tasks = [
                loop.create_task(self._refresh_forever(state), name="presence-refresh"),
                loop.create_task(self._sweep_forever(), name="presence-sweep"),
            ]
        return state

    # -- hooks ----------------------------------------------------------------------------

    async def connected(self, connection: Any) -> None:
        self.state()  # every node with sockets sweeps, so a dead node's users leave

    async def subscribed(self, connection: Any, stream: str, policy: Any) -> dict[str, Any] | None:
        if not policy.presence or not presence_settings.ENABLED:
            return None
        state = self.state()
        user_id = str(connection.user.pk)
        now = time.time()
        entry = (stream, user_id, connection.connection_id)
        backend = get_backend()
        async with state.lock:
            state.entries[entry] = connection
            try:
                first = await _call(
                    state, lambda: backend.join(stream, *entry[1:], _node(), now + _ttl(), now)
                )
            except BackendResting:
                state.unwritten.add(entry)
                return None  # the next refresh writes it (the failure that began it is logged)
            except Exception:
                _unsure(state, now)  # the next refresh writes it again, or finds it written
                raise
        if first:
            shown = await _thread(serializer())(connection.user)
            await _announce(
                stream,
                JOINED,
                {"user": shown, "since": iso(now)},
                origin=connection.connection_id,
            )
            await _signal(presence_joined, stream, user_id)
        if getattr(connection, "transport", "websocket") != "websocket":
            return None  # an SSE stream has no subscribe reply to carry the list
        listed, total = await member_list(stream, include=user_id)
        return {"presence": listed, "presenceTotal": total}

    async def unsubscribed(self, connection: Any, stream: str, policy: Any, reason: str) -> None:
        if not policy.presence or not presence_settings.ENABLED:
            return
        state = self.state()
        entry = (stream, str(connection.user.pk), connection.connection_id)
        # In a task of its own, awaited shielded: a server that cancels the closing socket
        # (its close timeout) must not cut the leave off between the backend's answer and the
        # announcement, which nothing would send later.
        task = asyncio.get_running_loop().create_task(self._leave(state, entry, reason))
        _background_tasks.add(task)
        task.add_done_callback(_background_tasks.discard)
        await asyncio.shield(task)

    async def _leave(self, state: _LoopState, entry: tuple[str, str, str], reason: str) -> None:
        stream, user_id, connection_id = entry
        backend = get_backend()
        async with state.lock:
            state.entries.pop(entry, None)
            if entry in state.unwritten:
                state.unwritten.discard(entry)
                return  # never written, so never announced: nothing to take back
            try:
                last = await _call(state, lambda: backend.leave(stream, user_id, connection_id))
            except BaseException as exc:
                # It may have run with its reply lost, and then nothing would announce this
                # leave: the next refresh makes the entry expire, and a sweep announces it.
                state.leaving[entry] = state.written + _ttl()
                if isinstance(exc, BackendResting):
                    return
                raise
            since = last if isinstance(last, float) else 0.0  # True: a backend that cannot say
            if last and _never_announced(state, stream, user_id, since):
                # Its join's outcome was unknown (or it waited to be announced by a refresh):
                # nobody was told it joined, so nobody is told it left.
                state.typing.pop((stream, user_id), None)
                return
        if last:
            # Only with the user's last connection: another tab may be typing, and its
            # `stopped` must still end the `started` forwarded for it.
            state.typing.pop((stream, user_id), None)
            await announce_left(Change(stream, user_id, since), reason)

    async def publishing(
        self, connection: Any, stream: str, policy: Any, event_type: str, data: Any
    ) -> tuple[bool, Any]:
        if event_type not in (TYPING_STARTED, TYPING_STOPPED):
            return True, data
        state = self.state()
        key = (stream, str(connection.user.pk))
        now = time.monotonic()
        last = state.typing.get(key)
        if event_type == TYPING_STOPPED:
            # Only a `stopped` that ends a forwarded `started`: the throttle's interval stands,
            # so alternating the two cannot forward more than one `started` per interval.
            if last is None or last[1] is False:
                return False, data
            state.typing[key] = (last[0], False)
            return True, data
        if last is not None and now - last[0] < float(presence_settings.TYPING_INTERVAL):
            return False, data
        if len(state.typing) >= _TYPING_MEMORY:  # bounded: forget the stalest half
            for stale in sorted(state.typing, key=state.typing.__getitem__)[: _TYPING_MEMORY // 2]:
                del state.typing[stale]
        state.typing[key] = (now, True)
        extra = data if isinstance(data, dict) else {}
        return True, {**extra, "expiresIn": int(presence_settings.TYPING_EXPIRES_MS)}

    # -- background -------------------------------------------------------------------------

    async def _refresh_forever(self, state: _LoopState) -> None:
        while True:
            await asyncio.sleep(_refresh_interval())
            try:
                await self._refresh(state)
            except Exception:
                logger.warning("presence refresh failed; retrying", exc_info=True)

    async def _refresh(self, state: _LoopState) -> None:
        backend = get_backend()
        async with state.lock:  # no entry joins or leaves while the refresh writes
            now = time.time()  # after the wait for the lock: the expiries it writes start now
            await _settle_leaves(state, backend, now)
            # A connection that is closing, or whose consumer was cancelled before its
            # leaves ran, is not refreshed: its entries expire after the TTL, and a sweep
            # announces the leave, instead of it staying present for good.
            for entry in [e for e, conn in state.entries.items() if _gone(conn)]:
                del state.entries[entry]
                state.unwritten.discard(entry)
            entries = sorted(state.entries)
            try:
                rejoined = await _call(
                    state,
                    lambda: backend.refresh(entries, _node(), now + _ttl(), now),
                    rest=False,  # the refresh is what finds the backend back
                    factor=_REFRESH_TIMEOUT_FACTOR,
                )
            except Exception:
                _unsure(state, now)
                raise
            state.written = now
            state.unwritten.difference_update(entries)
            for change in rejoined:  # swept while this node stalled: present again
                state.unannounced[(change.stream, change.user_id)] = change.since
            if state.unsure:
                await _find_unannounced(state, backend, entries)
            # Only users still here: one who left since had that leave announced.
            held = {(stream, user) for stream, user, _connection in state.entries}
            for key in [key for key in state.unannounced if key not in held]:
                del state.unannounced[key]
            if not state.unannounced:
                return
            pending = dict(state.unannounced)
        shown = await _thread(display_many)(sorted({user for _stream, user in pending}))
        for (stream, user), since in pending.items():
            if state.unannounced.get((stream, user)) != since:
                continue
            del state.unannounced[(stream, user)]
            # As a join says it (display fields), and to the user's own sockets too: they
            # got the sweep's `left` about themselves.
            fields = shown.get(user) or {"id": user_id(user)}
            await _announce(stream, JOINED, {"user": fields, "since": iso(since)})
            await _signal(presence_joined, stream, user)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(float(presence_settings.SWEEP_INTERVAL))
            try:
                await sweep()
            except Exception:
                logger.warning("presence sweep failed; retrying", exc_info=True)


async def _call(state: _LoopState, call: Any, *, rest: bool = True, factor: float = 1.0) -> Any:
    """Await `call()` on the backend within BACKEND_TIMEOUT (times `factor`). A call that
    runs out of that time makes the loop's joins and leaves leave the backend alone for
    `_REST` seconds (an error that comes at once costs no wait, and does not), and a success
    ends that; with `rest` (joins and leaves: the refresh's calls always try), a call in that
    time raises `BackendResting` at once.

    Joins and leaves wait for each other (the loop's lock): without a bound, a Redis that
    stalls (no answer, no refusal) would hold each of them for the client's socket timeout,
    one after another, and the sockets behind them would stop answering their pings.
    """
    if rest and time.monotonic() < state.resting_until:
        raise BackendResting("the presence backend failed moments ago")
    try:
        async with asyncio.timeout(float(presence_settings.BACKEND_TIMEOUT) * factor):
            result = await call()
    except TimeoutError:
        state.resting_until = time.monotonic() + _REST
        raise
    state.resting_until = 0.0
    return result


def _unsure(state: _LoopState, now: float) -> None:
    state.unsure.append(now)
    del state.unsure[:-_UNSURE_MEMORY]  # bounded: a backend down for hours adds one a refresh


def _never_announced(state: _LoopState, stream: str, user_id: str, since: float) -> bool:
    """Whether the presence that began at `since` was never announced (and forget it)."""
    if since and state.unannounced.get((stream, user_id)) == since:
        del state.unannounced[(stream, user_id)]
        return True
    if since and since in state.unsure:
        state.unsure.remove(since)
        return True
    return False


async def _find_unannounced(
    state: _LoopState, backend: PresenceBackend, entries: list[tuple[str, str, str]]
) -> None:
    """Find the presences that joins of unknown outcome made (their `since` is the `now` such
    a join wrote), among the users of this loop's entries."""
    stamps = set(state.unsure)
    users: dict[str, set[str]] = {}
    for stream, user, _connection in entries:
        users.setdefault(stream, set()).add(user)
    # All streams in one call (one pipeline on Redis): this runs under the loop's lock, which
    # holds up its joins and leaves, and a node may have thousands of streams.
    try:
        members = await _call(
            state,
            lambda: backend.members_many(sorted(users)),
            rest=False,
            factor=_REFRESH_TIMEOUT_FACTOR,
        )
    except Exception:
        logger.warning(
            "presence members of %d streams not read; retrying", len(users), exc_info=True
        )
        return  # still unsure: the next refresh looks again
    for stream, present in users.items():
        found = members.get(stream, {})
        for user in present:
            if found.get(user) in stamps:
                state.unannounced[(stream, user)] = found[user]
    state.unsure.clear()


async def _settle_leaves(state: _LoopState, backend: PresenceBackend, now: float) -> None:
    """Make the entries of leaves that raised expire now, so that a sweep announces the leave
    whether or not the leave ran (atomically: once, and only for a user's last entry)."""
    for entry, deadline in list(state.leaving.items()):
        if now >= deadline or entry in state.entries:
            # Past its expiry a sweep may have taken it (and announced the leave), and an
            # entry subscribed again is live: either way, nothing is left to settle.
            del state.leaving[entry]
            continue
        stream, user, connection = entry
        try:
            # Awaited here, in this turn of the loop: the lambda's names are this entry's.
            await _call(
                state,
                lambda: backend.join(stream, user, connection, _node(), 0.0, now),  # noqa: B023
                rest=False,
            )
        except Exception:
            # The others would most likely wait and fail too, each holding the loop's lock:
            # the next refresh settles them.
            logger.warning("presence leave of %s not settled; retrying", entry, exc_info=True)
            return
        del state.leaving[entry]


tracker = PresenceTracker()
