"""The hub's layer probe: a silent layer is noticed, and subscriptions resync from the log."""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

import realtime
from board.membership import add_member, remove_member
from realtime import metrics
from realtime.consumers import RealtimeConsumer
from realtime.fanout import get_hub, reconnect_layer
from realtime.testing import RealtimeClient, session_for

from .factories import ProjectFactory, UserFactory
from .test_sse import open_sse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


def emit(stream: str, count: int) -> None:
    for n in range(count):
        realtime.emit(stream, "v1:tick.happened", {"n": n})


async def eventually(condition: Any) -> None:
    """Wait up to 5 s for `condition()` (a value, or an awaitable of one) to be true."""
    for _ in range(250):
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within 5 s")


class Recording:
    """A hub subscriber that keeps the messages handed to it."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []

    def deliver(self, message: dict[str, Any]) -> None:
        self.got.append(message)

    def resync(self) -> None:
        pass


def deafen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the layer lose every message, as a link that went silent does: no error."""

    async def lost(*args: Any) -> None:
        return None

    layer = get_channel_layer()
    monkeypatch.setattr(layer, "send", lost)
    monkeypatch.setattr(layer, "group_send", lost)


async def test_a_silent_layer_is_noticed_and_a_socket_gets_what_it_missed(settings, monkeypatch):
    settings.REALTIME = {"LAYER_PROBE_INTERVAL": 0.1, "PUBLISH_TIMEOUT": 1.0}
    owner = await db(UserFactory)()
    stream = f"user:{owner.pk}"
    client = RealtimeClient(session_key=await db(session_for)(owner))
    await client.connect()
    await client.subscribe(stream)
    await db(emit)(stream, 1)
    assert (await client.receive_until("event"))["seq"] == 1
    hub = get_hub()
    stalls = metrics.LAYER_STALLS._value.get()

    deafen(monkeypatch)
    await db(emit)(stream, 3)  # published into the void
    await eventually(lambda: hub.stalled)
    assert metrics.LAYER_STALLS._value.get() == stalls + 1
    assert await client.nothing_more(0.3)

    monkeypatch.undo()  # the layer answers again: the client gets what it missed, unasked
    assert [(await client.receive_until("event"))["seq"] for _ in range(3)] == [2, 3, 4]
    assert not hub.stalled
    await db(emit)(stream, 1)
    assert (await client.receive_until("event"))["seq"] == 5  # and live again, once
    assert await client.nothing_more(0.3)
    await client.close()


async def test_a_permission_revoked_while_the_layer_was_silent_is_applied_before_a_replay(
    settings, monkeypatch
):
    settings.REALTIME = {"LAYER_PROBE_INTERVAL": 0.1, "PUBLISH_TIMEOUT": 1.0}
    owner, reader = await db(UserFactory)(), await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, reader)
    stream = f"project:{project.pk}"
    client = RealtimeClient(session_key=await db(session_for)(reader))
    await client.connect()
    await client.subscribe(stream)
    hub = get_hub()

    deafen(monkeypatch)
    await db(remove_member)(project, reader)  # its control message is lost too
    await db(emit)(stream, 2)
    await eventually(lambda: hub.stalled)
    monkeypatch.undo()
    frame = await client.receive_until("unsubscribed")
    assert frame == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    assert await client.nothing_more(0.5)  # and none of the events it may no longer see
    await client.close()


async def test_an_sse_stream_gets_what_it_missed_after_a_silent_layer(settings, monkeypatch):
    settings.REALTIME = {"LAYER_PROBE_INTERVAL": 0.1, "PUBLISH_TIMEOUT": 1.0}
    owner = await db(UserFactory)()
    stream = f"user:{owner.pk}"
    reader, _opened = await open_sse(owner, stream)
    await db(emit)(stream, 1)
    assert (await reader.event("v1:tick.happened"))["data"]["seq"] == 1
    hub = get_hub()

    deafen(monkeypatch)
    await db(emit)(stream, 2)
    await eventually(lambda: hub.stalled)
    monkeypatch.undo()
    seqs = [(await reader.event("v1:tick.happened"))["data"]["seq"] for _ in range(2)]
    assert seqs == [2, 3]
    await reader.close()


async def test_reconnect_knows_only_the_redis_pub_sub_layer():
    assert await reconnect_layer(get_channel_layer()) is False  # the in-memory layer


async def test_a_blocked_event_loop_is_not_taken_for_a_silent_layer(settings):
    """A loop too busy to run the probe on time (a handshake storm) proves nothing about the
    link: no stall is counted and nothing resyncs, while the layer itself is fine."""
    import time

    settings.REALTIME = {"LAYER_PROBE_INTERVAL": 0.1}
    owner = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(owner))
    await client.connect()
    await client.subscribe(f"user:{owner.pk}")
    hub = get_hub()
    stalls = metrics.LAYER_STALLS._value.get()
    for _ in range(4):
        time.sleep(0.5)  # noqa: ASYNC251  # the loop is blocked for five probe intervals
        await asyncio.sleep(0.15)  # then runs a little: the probe wakes late
    assert not hub.stalled
    assert metrics.LAYER_STALLS._value.get() == stalls
    await client.close()


def consumer_of(connection_id: str) -> Any:
    return next(
        c for c in get_hub().connections if getattr(c, "connection_id", None) == connection_id
    )


async def subscribed(count: int) -> tuple[str, list[RealtimeClient], list[Any]]:
    """`count` sockets of one new user, each subscribed to the user's stream: the stream,
    the clients and their consumers."""
    owner: Any = await db(UserFactory)()
    stream = f"user:{owner.pk}"
    session = await db(session_for)(owner)
    clients, consumers = [], []
    for _ in range(count):
        client = RealtimeClient(session_key=session)
        welcome = await client.connect()
        await client.subscribe(stream)
        clients.append(client)
        consumers.append(consumer_of(welcome["connectionId"]))
    return stream, clients, consumers


async def test_the_hub_sends_an_event_to_its_sockets_without_a_task_per_socket(monkeypatch):
    stream, clients, _consumers = await subscribed(3)
    writers = 0
    real_write = RealtimeConsumer._write

    def counting(self: Any, *args: Any) -> Any:
        nonlocal writers
        writers += 1
        return real_write(self, *args)

    monkeypatch.setattr(RealtimeConsumer, "_write", counting)
    await db(emit)(stream, 2)
    for client in clients:
        assert [(await client.receive_until("event"))["seq"] for _ in range(2)] == [1, 2]
    assert writers == 0  # the hub sent each frame itself
    for client in clients:
        await client.close()


async def test_a_send_the_server_makes_wait_holds_up_neither_others_nor_the_order():
    stream, (stuck, other), (consumer, _other) = await subscribed(2)
    gate = asyncio.Event()
    real_send = consumer.base_send

    async def waiting(message: dict[str, Any]) -> None:
        if '"op":"event"' in message.get("text", "").replace(" ", ""):
            await gate.wait()  # as a server whose buffer for this client is full
        await real_send(message)

    consumer.base_send = waiting
    await db(emit)(stream, 3)
    assert [(await other.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    assert isinstance(consumer.writer, asyncio.Task)  # the rest waits in the socket's task
    assert await stuck.nothing_more(0.2)
    gate.set()
    assert [(await stuck.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    await eventually(lambda: consumer.writer is None)
    await db(emit)(stream, 1)
    assert (await stuck.receive_until("event"))["seq"] == 4
    for client in (stuck, other):
        await client.close()


async def test_a_send_waiting_in_its_task_is_cancelled_with_the_socket():
    stream, [client], [consumer] = await subscribed(1)
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def waiting(message: dict[str, Any]) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer.base_send = waiting
    await db(emit)(stream, 1)
    await eventually(lambda: isinstance(consumer.writer, asyncio.Task))
    writer = consumer.writer
    await client.close()
    await eventually(cancelled.is_set)
    await eventually(writer.done)
    assert writer.cancelled()


@pytest.mark.parametrize(
    ("configured", "expected"), [((700, 10, 1234), (700, 10, 1234)), (None, (650, 9, 8))]
)
async def test_a_process_serving_sockets_applies_gc_thresholds(
    settings, monkeypatch, configured, expected
):
    import gc

    from realtime import fanout

    settings.REALTIME = {"GC_THRESHOLDS": configured}
    before = gc.get_threshold()
    monkeypatch.setattr(fanout, "_gc_tuned", False)  # a process that served no socket yet
    gc.set_threshold(650, 9, 8)
    try:
        owner = await db(UserFactory)()
        client = RealtimeClient(session_key=await db(session_for)(owner))
        await client.connect()
        assert gc.get_threshold() == expected
        await client.close()
    finally:
        gc.set_threshold(*before)


async def test_heartbeats_are_spread_over_the_interval(settings):
    from realtime.fanout import HEARTBEAT_SLICES, Hub

    settings.REALTIME = {"HEARTBEAT": 0.5}
    beats: list[tuple[int, float]] = []

    class Connection:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return self.n

        def heartbeat(self, now: float) -> None:
            beats.append((self.n, now))

    hub = Hub(asyncio.get_running_loop())
    hub.connections = {Connection(n) for n in range(3 * HEARTBEAT_SLICES)}  # type: ignore[misc]
    tick = asyncio.get_running_loop().create_task(hub._tick())
    await eventually(lambda: len(beats) >= 2 * 3 * HEARTBEAT_SLICES)
    tick.cancel()
    rounds: dict[float, list[int]] = {}
    for n, now in beats:
        rounds.setdefault(now, []).append(n)
    # each turn of the tick pings a tenth of the sockets, the same tenth every interval
    for ns in rounds.values():
        assert len(ns) == 3
        assert len({n % HEARTBEAT_SLICES for n in ns}) == 1
    first = [n for n, _now in beats[: 3 * HEARTBEAT_SLICES]]
    assert sorted(first) == list(range(3 * HEARTBEAT_SLICES))  # every socket once per interval


async def test_a_send_the_server_refuses_closes_that_socket_only():
    stream, (broken, other), (consumer, _other) = await subscribed(2)
    real_send = consumer.base_send

    async def refusing(message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.send":
            raise ValueError("the server refused the frame")
        await real_send(message)

    consumer.base_send = refusing
    await db(emit)(stream, 2)
    assert [(await other.receive_until("event"))["seq"] for _ in range(2)] == [1, 2]
    closed = await broken.receive()
    assert closed == {"type": "websocket.close", "code": 4500}
    await db(emit)(stream, 1)  # the hub goes on
    assert (await other.receive_until("event"))["seq"] == 3
    await other.close()


async def test_sockets_whose_turn_is_later_still_get_everything_in_order(monkeypatch):
    """The hub yields between chunks of sockets; frames queued meanwhile keep their order."""
    from realtime import fanout

    monkeypatch.setattr(fanout, "FLUSH_CHUNK", 1)
    stream, clients, _consumers = await subscribed(4)
    await db(emit)(stream, 5)
    for client in clients:  # replies queued while the hub may be between chunks
        await client.send({"op": "ping", "ref": "p"})
    for client in clients:
        frames = [await client.receive() for _ in range(6)]
        assert [f["seq"] for f in frames if f["op"] == "event"] == [1, 2, 3, 4, 5]
        assert [f["op"] for f in frames].count("pong") == 1
    await db(emit)(stream, 1)
    for client in clients:
        assert (await client.receive_until("event"))["seq"] == 6
        await client.close()


async def test_an_event_the_hub_waited_for_goes_out_in_chunks_a_backlog_in_one_go(monkeypatch):
    from realtime import fanout
    from realtime.publisher import LAYER_MESSAGE_TYPE

    monkeypatch.setattr(fanout, "FLUSH_CHUNK", 1)
    # "Waited for" means longer than this; a Redis round trip for an event already queued
    # must not count as waiting on a loaded machine.
    monkeypatch.setattr(fanout, "WAITED", 0.025)
    stream, clients, _consumers = await subscribed(4)
    hub = get_hub()
    await asyncio.sleep(0.1)  # the hub waits for the next event
    before = hub.chunked
    layer = get_channel_layer()
    for seq in (1, 2, 3):  # queued at once: the first was waited for, the others were not
        frame = f'{{"op":"event","stream":"{stream}","seq":{seq}}}'
        message = {"type": LAYER_MESSAGE_TYPE, "stream": stream, "seq": seq, "frames": {"*": frame}}
        await layer.send(hub.channel, message)
    for client in clients:
        assert [(await client.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    assert hub.chunked - before == 3  # 4 sockets, chunks of 1: three turns, first event only
    for client in clients:
        await client.close()


async def test_frames_go_past_the_session_wrapper_the_handshake_through_it(monkeypatch):
    """Channels' session wrapper acts on HTTP responses only; frames skip its per-send reads."""
    from channels.sessions import InstanceSessionWrapper

    passed: list[dict[str, Any]] = []
    wrapped = InstanceSessionWrapper.send

    async def spy(self: InstanceSessionWrapper, message: dict[str, Any]) -> None:
        passed.append(message)
        await wrapped(self, message)

    monkeypatch.setattr(InstanceSessionWrapper, "send", spy)
    stream, [client], _consumers = await subscribed(1)
    await db(emit)(stream, 3)
    assert [(await client.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    assert [m["type"] for m in passed if m["type"] != "websocket.send"] == ["websocket.accept"]
    assert not [m for m in passed if '"event"' in m.get("text", "")]
    await client.close()


async def test_hub_tasks_do_not_run_in_the_context_of_the_request_that_started_them(monkeypatch):
    from realtime.context import get_correlation_id
    from realtime.fanout import Hub

    seen: list[str | None] = []

    async def listen(self: Hub) -> None:
        seen.append(get_correlation_id())

    monkeypatch.setattr(Hub, "_listen", listen)
    hub = Hub(asyncio.get_running_loop())
    with realtime.correlation("the-first-request"):
        await hub._start()
    try:
        await asyncio.sleep(0.05)
    finally:
        for task in hub._tasks:
            task.cancel()
        await asyncio.gather(*hub._tasks, return_exceptions=True)
    # The hub serves every later request too: its log lines carry none of their ids.
    assert seen == [None]


async def test_permission_messages_that_come_while_one_waits_are_one_decision(monkeypatch):
    _stream, clients, consumers = await subscribed(1)
    consumer = consumers[0]
    decisions: list[int] = []

    async def realtime_authz(self: Any, message: dict[str, Any]) -> None:
        decisions.append(1)

    monkeypatch.setattr(RealtimeConsumer, "realtime_authz", realtime_authz)
    for _ in range(5):  # e.g. remove_member deletes three permission rows: three messages
        consumer.control({"type": "realtime.authz"})
    await asyncio.sleep(0.1)
    assert decisions == [1]  # the one waiting read the permissions after all five changes
    consumer.control({"type": "realtime.authz"})  # a later change: decided again
    await asyncio.sleep(0.1)
    assert decisions == [1, 1]
    await clients[0].close()


async def test_a_resync_that_cannot_reach_the_database_closes_rather_than_stalls(monkeypatch):
    from realtime import policies

    stream, clients, consumers = await subscribed(1)
    subscription = consumers[0].subscriptions[stream]

    def unreachable(user: Any) -> Any:
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(policies, "reload_user", unreachable)
    subscription.resync()
    # Replaying (buffering) for ever would deliver nothing, silently: the client resumes.
    closed = await clients[0].receive_until("never", timeout=5)
    assert closed == {"type": "websocket.close", "code": 4500}


async def test_a_stream_followed_longer_than_the_layers_group_expiry_still_gets_events(
    monkeypatch,
):
    """The in-memory and channels-redis core layers drop group members after group_expiry."""
    from realtime.testing import RealtimeClient, flush, session_for

    monkeypatch.setattr(get_channel_layer(), "group_expiry", 1, raising=False)
    user = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    stream = f"user:{user.pk}"
    assert (await client.subscribe(stream))["ok"]
    await asyncio.sleep(2.5)

    def emit():
        realtime.emit(stream, "v1:tick.happened", {})
        flush()

    await db(emit)()
    frame = await client.receive_until("event", timeout=3)
    assert frame["type"] == "v1:tick.happened"
    await client.close()


async def test_delivery_latency_runs_from_the_events_timestamp_to_its_last_subscriber(
    monkeypatch,
):
    """Observed once per event, after every local subscriber has it, from the log's time."""
    import datetime as dt

    from realtime.events import format_timestamp
    from realtime.publisher import LAYER_MESSAGE_TYPE

    order: list[str] = []

    class Ordered:
        def deliver(self, message: dict[str, Any]) -> None:
            order.append("deliver")

        def resync(self) -> None:
            pass

    class Histogram:
        def observe(self, seconds: float) -> None:
            order.append(f"observe {seconds:.1f}")

    monkeypatch.setattr(metrics, "LATENCY", Histogram())
    hub = get_hub()
    stream = "user:latency"
    subscribers = [Ordered() for _ in range(3)]
    for subscriber in subscribers:
        await hub.join(stream, subscriber)
    written = format_timestamp(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=3))
    frame = f'{{"op":"event","stream":"{stream}","seq":1,"eventId":"e","type":"v1:a.b",'
    frame += f'"timestamp":"{written}","correlationId":null,"data":{{}}}}'
    message = {"type": LAYER_MESSAGE_TYPE, "stream": stream, "seq": 1, "frames": {"v1": frame}}
    try:
        await get_channel_layer().send(hub.channel, message)
        await eventually(lambda: any(o.startswith("observe") for o in order))
        assert order[:3] == ["deliver"] * 3
        assert order[3] in ("observe 3.0", "observe 3.1")  # waited 3 s before the layer
        assert len(order) == 4
    finally:
        for subscriber in subscribers:
            await hub.leave(stream, subscriber)


def hub_layer_class() -> Any:
    """The class whose group_add the hub calls: the in-memory layer, or under REDIS_URL the
    per-event-loop layer channels-redis's pub/sub layer hands its calls to."""
    layer = get_hub().layer
    per_loop = getattr(layer, "_get_layer", None)
    return type(per_loop() if per_loop is not None else layer)


def stuck_group_add(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Make the layer's group_add never return for groups named `prefix…`, as a pub/sub
    shard does whose lock a publish stuck on a dead connection holds."""
    layer_class = hub_layer_class()
    real_add = layer_class.group_add

    async def stuck(self: Any, group: str, channel: str) -> None:
        if group.startswith(prefix):
            await asyncio.Event().wait()
        await real_add(self, group, channel)

    monkeypatch.setattr(layer_class, "group_add", stuck)


async def test_a_join_stuck_in_the_layer_holds_up_no_other_socket_and_fails(settings, monkeypatch):

    settings.REALTIME = {"GROUP_TIMEOUT": 3.0}
    stuck_group_add(monkeypatch, "rt.project.")
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    first = RealtimeClient(session_key=await db(session_for)(owner))
    assert (await first.connect())["op"] == "welcome"
    await first.send({"op": "subscribe", "ref": "s", "stream": stream})
    await asyncio.sleep(0.2)  # its join now waits in the layer

    other = RealtimeClient(session_key=await db(session_for)(await db(UserFactory)()))
    # Welcomed while that join still waits (it gives up after 3 s), not behind it.
    assert (await other.connect(timeout=2.5))["op"] == "welcome"
    # The stuck join gives up after GROUP_TIMEOUT: the client is told, and may retry.
    reply = await first.receive_until("reply", timeout=5)
    assert (reply["ref"], reply["ok"], reply["error"]["code"]) == ("s", False, "internal_error")
    assert stream not in get_hub().members
    assert await first.nothing_more(0.2)  # the socket stays up
    await first.close()
    await other.close()


async def test_a_connect_whose_user_group_join_is_stuck_closes_with_4500(settings, monkeypatch):
    from realtime.models import Connection

    settings.REALTIME = {"GROUP_TIMEOUT": 0.5}
    stuck_group_add(monkeypatch, "rt-ctl.user.")
    user = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(user))
    closed = await client.connect(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4500}
    assert str(user.pk) not in get_hub().user_listeners
    assert not await db(Connection.objects.filter(user=user).exists)()  # its row is gone


async def test_a_leave_that_comes_while_its_join_waits_for_the_layer_leaves_nothing(monkeypatch):
    """A socket closed while its subscribe's group_add was still out: the join finishes after
    the leave began, and must not add the subscriber behind it."""
    gate = asyncio.Event()
    layer_class = hub_layer_class()
    real_add = layer_class.group_add

    async def slow(self: Any, group: str, channel: str) -> None:
        if group == "rt.user.slow-join":
            await gate.wait()
        await real_add(self, group, channel)

    monkeypatch.setattr(layer_class, "group_add", slow)

    hub, stream, subscriber = get_hub(), "user:slow-join", Recording()
    join = asyncio.create_task(hub.join(stream, subscriber))
    await asyncio.sleep(0.05)
    leave = asyncio.create_task(hub.leave(stream, subscriber))
    await asyncio.sleep(0.05)
    gate.set()
    await join
    await leave
    assert stream not in hub.members


@pytest.mark.redis
async def test_joins_and_leaves_cut_off_behind_a_stuck_publish_leave_pubsub_consistent(settings):
    """channels-redis' pub/sub layer: a publish stuck on its connection holds its shard's lock,
    so a join or a leave of a group on that shard waits behind it, and gives up after
    GROUP_TIMEOUT. Once the lock is free, Redis' subscriptions agree with the hub's table: a
    stream left and joined again gets its events live, and a failed join leaves no
    subscription behind."""
    import redis.asyncio as aioredis

    from realtime.publisher import LAYER_MESSAGE_TYPE
    from realtime.streams import group_name

    settings.REALTIME = {"GROUP_TIMEOUT": 0.3, "TAIL_CHECK_INTERVAL": 0}

    hub = get_hub()
    left, failed = "user:cut-off-leave", "user:cut-off-join"
    first = Recording()
    await hub.join(left, first)
    loop_layer = hub.layer._get_layer()
    names = {s: loop_layer._get_group_channel_name(group_name(s)) for s in (left, failed)}
    shards = {loop_layer._get_shard(name) for name in names.values()}
    for shard in shards:  # as a publish that waits for a dead connection's answer does
        await shard._lock.acquire()
    try:
        await hub.leave(left, first)  # gives up (logged), the subscriber is out of the table
        with pytest.raises(TimeoutError):
            await hub.join(failed, Recording())
    finally:
        for shard in shards:
            shard._lock.release()
    assert left not in hub.members
    assert failed not in hub.members
    client = aioredis.from_url(os.environ["REDIS_URL"])
    try:

        async def subscribed() -> set[str]:
            found = await client.pubsub_channels("*cut-off*")
            return {name.decode() for name in found}

        async def undone() -> bool:
            return names[failed] not in await subscribed()

        # The failed join's undo runs once the lock is free: nothing of it stays subscribed.
        await eventually(undone)

        again, joined = Recording(), Recording()
        await hub.join(left, again)
        await hub.join(failed, joined)

        async def both_subscribed() -> bool:
            # A join returns once its SUBSCRIBE is sent; Redis lists it once it has run it.
            return {names[left], names[failed]} <= await subscribed()

        await eventually(both_subscribed)
        for stream in (left, failed):
            await hub.layer.group_send(
                group_name(stream),
                {"type": LAYER_MESSAGE_TYPE, "stream": stream, "ephemeral": True, "frame": "{}"},
            )
        await eventually(lambda: again.got and joined.got)
        assert [m["stream"] for m in again.got + joined.got] == [left, failed]
        assert first.got == []
        await hub.leave(left, again)
        await hub.leave(failed, joined)

        async def all_left() -> bool:
            return not await subscribed() & set(names.values())

        await eventually(all_left)
    finally:
        await client.aclose()
