"""A socket when its surroundings fail or lag: the channel layer, the database, the link."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

import realtime
from realtime import replay
from realtime.fanout import get_hub
from realtime.models import Connection
from realtime.testing import RealtimeClient, flush, session_for

from .factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


def emit(stream: str, count: int, pad: int = 0) -> None:
    for n in range(count):
        realtime.emit(stream, "v1:tick.happened", {"n": n, "pad": "x" * pad})
    flush()


async def connected() -> tuple[Any, RealtimeClient]:
    user = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    return user, client


def consumer_of(client: RealtimeClient) -> Any:
    assert client.welcome is not None
    connection_id = client.welcome["connectionId"]
    connections: list[Any] = list(get_hub().connections)
    return next(c for c in connections if c.connection_id == connection_id)


def rows_of(user: Any) -> int:
    return Connection.objects.filter(user=user).count()


def failing_for_user_groups(monkeypatch: Any, method: str) -> None:
    """Make the layer's `method` (group_add or group_discard) fail for users' control groups."""
    layer = get_channel_layer()
    real = getattr(layer, method)

    async def failing(group: str, channel: str) -> None:
        if "-ctl.user." in group:
            raise ConnectionError("redis blip")
        await real(group, channel)

    monkeypatch.setattr(layer, method, failing)


async def test_a_layer_error_at_disconnect_still_removes_the_connection_row(monkeypatch):
    user, client = await connected()
    assert await db(rows_of)(user) == 1
    failing_for_user_groups(monkeypatch, "group_discard")
    await client.close()
    assert await db(rows_of)(user) == 0


async def test_a_layer_error_at_connect_closes_4500_and_leaves_no_row(monkeypatch):
    user = await db(UserFactory)()
    failing_for_user_groups(monkeypatch, "group_add")
    client = RealtimeClient(session_key=await db(session_for)(user))
    connected, _subprotocol = await client.communicator.connect()
    assert connected  # accepted, then closed: the client retries after its backoff
    assert await client.receive(timeout=2.0) == {"type": "websocket.close", "code": 4500}
    assert await db(rows_of)(user) == 0


async def test_a_connect_the_server_gives_up_on_while_its_row_is_written_leaves_no_row(
    monkeypatch,
):
    """The server cancels a handshake that takes too long (daphne past its handshake and
    close timeouts). The row's thread cannot be stopped: the row it writes is deleted once
    it is written, and does not hold a place of the user's connection limit."""
    from realtime.consumers import RealtimeConsumer

    user = await db(UserFactory)()
    original = RealtimeConsumer._open_row
    written = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_open_row(self: Any, *args: Any) -> bool:
        opened = original(self, *args)
        time.sleep(0.6)  # a busy thread pool or a slow commit: the server gives up meanwhile
        loop.call_soon_threadsafe(written.set)
        return opened

    monkeypatch.setattr(RealtimeConsumer, "_open_row", slow_open_row)
    client = RealtimeClient(session_key=await db(session_for)(user))
    with pytest.raises(asyncio.TimeoutError):
        await client.communicator.connect(timeout=0.2)  # cancels the application
    await asyncio.wait_for(written.wait(), 5)
    for _ in range(50):
        if await db(rows_of)(user) == 0:
            break
        await asyncio.sleep(0.05)
    assert await db(rows_of)(user) == 0


async def test_a_subscribe_that_fails_midway_is_undone_and_can_be_retried(monkeypatch):
    user, client = await connected()
    stream = f"user:{user.pk}"
    real = replay.position
    calls = 0

    def flaky(name: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database blip")
        return real(name)

    monkeypatch.setattr(replay, "position", flaky)
    await client.send({"op": "subscribe", "ref": "s1", "stream": stream})
    failed = await client.receive_until("reply")
    assert (failed["ref"], failed["ok"]) == ("s1", False)  # the client's request settles
    assert failed["error"]["code"] == "internal_error"
    assert stream not in consumer_of(client).subscriptions
    assert (await client.subscribe(stream))["ok"] is True
    await db(emit)(stream, 3)
    assert [(await client.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    await client.close()


async def test_a_replay_batch_larger_than_the_credit_reaches_a_reading_client(settings):
    settings.REALTIME = {"MAX_UNACKED_BYTES": 4000}
    user, client = await connected()
    stream = f"user:{user.pk}"
    await db(emit)(stream, 30, pad=200)  # one batch of 30 x ~400 characters: 3x the credit
    await client.send({"op": "subscribe", "ref": "1", "stream": stream, "since": 0})
    seqs: list[int] = []
    while len(seqs) < 30:
        frame = await client.receive()
        assert frame.get("type") != "websocket.close", f"closed after {len(seqs)} events"
        if frame.get("op") == "ping":
            await client.send({"op": "pong"})
        elif frame.get("op") == "event":
            seqs.append(frame["seq"])
    assert seqs == list(range(1, 31))
    await client.close()


async def test_a_pong_acknowledges_only_what_came_before_its_ping(settings):
    """A pong answers the oldest unanswered ping, and gives back the credit of what was
    queued up to that ping, not of what was queued after it (a pong used to clear the whole
    count, so a client that read old pings late could fall behind without bound)."""
    settings.REALTIME = {"MAX_UNACKED_BYTES": 4000}
    user, client = await connected()
    stream = f"user:{user.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    consumer = consumer_of(client)
    consumer.heartbeat(time.monotonic())  # a ping now, before the events below
    # Frames of about 380 characters each (a correlation id of 32 included): 8 stay below the
    # credit with what came before the ping, 14 do not.
    await db(emit)(stream, 8, pad=150)  # about 3,000 characters after the ping
    assert (await client.receive())["op"] == "ping"
    await client.send({"op": "pong"})  # answered; the 8 events are still unread
    await asyncio.sleep(0.1)
    assert not consumer.closing
    await db(emit)(stream, 6, pad=150)  # about 2,300 more: 5,300 unacknowledged
    frames = []
    while not frames or frames[-1].get("type") != "websocket.close":
        frames.append(await client.receive())
    assert frames[-1] == {"type": "websocket.close", "code": 4409}
    events = [f["seq"] for f in frames if f.get("op") == "event"]
    assert events[:8] == list(range(1, 9))
    assert len(events) < 14  # not all of them: the rest is for the resume by since


async def test_a_slow_but_moving_link_finishes_its_replay_and_goes_live(settings, caplog):
    settings.REALTIME = {"HEARTBEAT": 1.0}
    user, client = await connected()
    stream = f"user:{user.pk}"
    await db(emit)(stream, 30)
    consumer = consumer_of(client)
    real_send = consumer.base_send

    async def slow_link(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await asyncio.sleep(0.1)  # 30 frames: 3 s, three heartbeats, for one batch
        await real_send(message)

    consumer.base_send = slow_link

    async def answering() -> None:
        while True:
            await asyncio.sleep(0.3)
            await client.send({"op": "pong"})

    alive = asyncio.create_task(answering())
    try:
        await client.send({"op": "subscribe", "ref": "1", "stream": stream, "since": 0})
        seqs = []
        while len(seqs) < 30:
            frame = await client.receive(timeout=10)
            assert frame.get("type") != "websocket.close", frame
            if frame.get("op") == "event":
                seqs.append(frame["seq"])
        consumer.base_send = real_send
        await db(emit)(stream, 1)  # live now
        assert (await client.receive_until("event", timeout=5))["seq"] == 31
    finally:
        alive.cancel()
    assert "replay of" not in caplog.text
    await client.close()


async def test_a_seq_missing_for_long_is_read_from_the_log(monkeypatch):
    """Seq 1's publish failed and the relay has not sent it, while over a thousand later
    events arrived live: the socket reads the log from its last contiguous seq instead of
    giving seq 1 up (a relayed copy arriving later used to be dropped as a duplicate)."""
    from channels.layers import get_channel_layer

    from realtime.publisher import LAYER_MESSAGE_TYPE, publisher

    user, client = await connected()
    stream = f"user:{user.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    monkeypatch.setattr(publisher, "submit", lambda items: None)  # nothing published live
    await db(emit)(stream, 1030)
    hub = get_hub()
    layer = get_channel_layer()
    for seq in range(2, 1028):  # what other nodes published live: all but seq 1
        frame = f'{{"op":"event","stream":"{stream}","seq":{seq}}}'
        message = {"type": LAYER_MESSAGE_TYPE, "stream": stream, "seq": seq, "frames": {"*": frame}}
        await layer.send(hub.channel, message)
        if seq % 50 == 0:
            await asyncio.sleep(0.05)  # within the layer's channel capacity
    seqs: list[int] = []
    while len(seqs) < 1030:
        frame = await client.receive(timeout=10)
        assert frame.get("type") != "websocket.close", frame
        if frame.get("op") == "ping":
            await client.send({"op": "pong"})
        elif frame.get("op") == "event":
            seqs.append(frame["seq"])
    assert sorted(seqs) == list(range(1, 1031))  # seq 1 and 1028-1030 from the log, once each
    await client.close()


async def test_every_close_code_the_server_sends_is_one_daphne_can_send():
    """Autobahn (daphne) sends only 1000 and 3000-4999, and raises for any other code."""
    from realtime.protocol import Close

    sent_by_the_asgi_server = {Close.GOING_AWAY}  # its own, as it shuts down; never ours
    codes = {name: v for name, v in vars(Close).items() if name.isupper() and isinstance(v, int)}
    assert len(codes) > 5
    for name, code in codes.items():
        if code not in sent_by_the_asgi_server:
            assert code == 1000 or 3000 <= code <= 4999, name


async def test_a_close_code_the_server_refuses_still_closes_the_socket(monkeypatch):
    """A refused code must not leave a socket that is `closing` (so it answers nothing and
    sends no ping) but never closed."""
    from realtime.consumers import RealtimeConsumer
    from realtime.protocol import Close

    user = await db(UserFactory)()
    stream = f"user:{user.pk}"
    await db(emit)(stream, 1)
    real_close = RealtimeConsumer.close

    async def strict_close(self, code=None, reason=None):
        if code is not None and code != 1000 and not 3000 <= code <= 4999:
            raise ValueError(f"invalid close code {code}")  # as autobahn's sendClose does
        await real_close(self, code)

    monkeypatch.setattr(RealtimeConsumer, "close", strict_close)
    monkeypatch.setattr(Close, "INTERNAL_ERROR", 1011, raising=False)

    def broken(*args):
        raise RuntimeError("replay failed")

    monkeypatch.setattr(replay, "read_typed_after", broken)
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    await client.send({"op": "subscribe", "ref": "s", "stream": stream, "since": 0})
    while (frame := await client.receive(timeout=3)).get("op") in ("reply", "ping"):
        pass
    assert frame["type"] == "websocket.close"


async def test_an_event_larger_than_the_whole_credit_reaches_a_reading_client(settings):
    settings.REALTIME = {**settings.REALTIME, "MAX_UNACKED_BYTES": 4000}
    user = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    stream = f"user:{user.pk}"
    assert (await client.subscribe(stream))["ok"]
    await db(emit)(stream, 1, pad=5000)
    while (frame := await client.receive(timeout=3)).get("op") == "ping":
        await client.send({"op": "pong"})
    assert frame.get("op") == "event", frame  # not a 4409 close, which a resume would repeat
    assert len(frame["data"]["pad"]) == 5000
    await client.close()


async def test_a_frame_let_over_the_credit_is_followed_by_a_ping_a_pong_can_clear(settings):
    """A heartbeat ping was unanswered when the big frame went: the pong to that ping
    acknowledges only what came before the frame, so another ping must follow it."""
    settings.REALTIME = {**settings.REALTIME, "MAX_UNACKED_BYTES": 4000, "HEARTBEAT": 0.5}
    user = await db(UserFactory)()
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    stream = f"user:{user.pk}"
    assert (await client.subscribe(stream))["ok"]
    while (await client.receive(timeout=3)).get("op") != "ping":
        pass  # a heartbeat ping, left unanswered for now
    await db(emit)(stream, 1, pad=5000)
    pings = 1
    while (frame := await client.receive(timeout=3)).get("op") != "event":
        pings += frame.get("op") == "ping"
    # The ping behind the frame: waited for, not hoped for within a moment (a loaded machine).
    while (await client.receive(timeout=3)).get("op") != "ping":
        pass
    pings += 1
    while not await client.communicator.receive_nothing(0.2):
        pings += (await client.receive()).get("op") == "ping"  # heartbeats since
    for _ in range(pings):
        await client.send({"op": "pong"})
    # The socket reads its frames in order: once this ping is answered, so were the pongs (an
    # event that the hub queued before the socket read them would find the credit spent).
    await client.send({"op": "ping", "ref": "after-the-pongs"})
    while (await client.receive(timeout=3)).get("ref") != "after-the-pongs":
        pass
    await db(emit)(stream, 1)
    while (frame := await client.receive(timeout=3)).get("op") == "ping":
        await client.send({"op": "pong"})
    assert frame.get("op") == "event", frame  # not closed with 4409 as a slow consumer
    await client.close()


async def test_a_socket_cancelled_again_while_it_leaves_still_releases_its_row(monkeypatch):
    """Daphne cancels a closing application again every second while a stuck layer makes
    each leave wait: the row and the user's watch must go all the same."""
    from realtime import fanout

    original = fanout.Hub.leave

    async def slow_leave(self: Any, stream: str, subscriber: Any) -> None:
        await asyncio.sleep(0.5)  # a layer slow to answer the group_discard
        await original(self, stream, subscriber)

    original_unwatch = fanout.Hub.unwatch_user

    async def slow_unwatch(self: Any, user_pk: Any, listener: Any) -> None:
        await asyncio.sleep(0.5)  # the user's group too
        await original_unwatch(self, user_pk, listener)

    monkeypatch.setattr(fanout.Hub, "leave", slow_leave)
    monkeypatch.setattr(fanout.Hub, "unwatch_user", slow_unwatch)
    user, client = await connected()
    await client.send({"op": "subscribe", "ref": "s", "stream": f"user:{user.pk}"})
    await client.receive_until("reply")
    assert await db(rows_of)(user) == 1
    await client.communicator.send_input({"type": "websocket.disconnect", "code": 1001})
    await asyncio.sleep(0.1)  # disconnect() is leaving its stream
    client.communicator.future.cancel()  # the server's cancel, and another while it unwatches
    await asyncio.sleep(0.2)
    client.communicator.future.cancel()
    async with asyncio.timeout(5):  # released by a background task: nothing to wait on
        while await db(rows_of)(user):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        while str(user.pk) in get_hub().user_listeners:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        while get_hub().members.get(f"user:{user.pk}"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
