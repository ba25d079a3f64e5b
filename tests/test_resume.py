"""Resume: replay then live with no gap and no duplicate at the seam, in bounded batches."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async

import realtime.replay
from board.models import Item
from realtime.testing import RealtimeClient, session_for

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


async def connected(user) -> RealtimeClient:
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    return client


async def receive_seqs(client: RealtimeClient, count: int) -> list[int]:
    return [(await client.receive_until("event"))["seq"] for _ in range(count)]


@pytest.mark.parametrize("when", ["before_read", "after_read"])
async def test_event_committed_during_replay_arrives_exactly_once(monkeypatch, when):
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for _ in range(3):
        await db(ItemFactory)(project=project)
    original = realtime.replay.read_typed_after
    calls = []

    def racing_read(stream, after, limit):
        calls.append(after)
        if len(calls) == 1 and when == "before_read":
            Item.objects.create(project=project, title="racer")  # committed, then read
        rows = original(stream, after, limit)
        if len(calls) == 1 and when == "after_read":
            Item.objects.create(project=project, title="racer")  # committed after the read
        return rows

    monkeypatch.setattr(realtime.replay, "read_typed_after", racing_read)
    client = await connected(owner)
    reply = await client.subscribe(f"project:{project.pk}", since=1)
    assert reply["data"]["recovered"] is True
    assert await receive_seqs(client, 4) == [2, 3, 4, 5]  # 3 logged + the racer, once
    assert await client.nothing_more(0.3)
    await db(ItemFactory)(project=project)
    assert await receive_seqs(client, 1) == [6]
    await client.close()


def recording_sends(steps: list[tuple[str, int, int]]) -> Any:
    """The realtime application, noting ("sent", seq, 1) as each event frame leaves the consumer.

    The socket's frames go to this send (Channels' session wrapper is bypassed down to it),
    so a step is recorded when the consumer hands the frame to the server, not when the
    test gets round to reading it.
    """
    from realtime.routing import websocket_application

    inner = websocket_application()

    async def application(scope, receive, send):
        async def noting(message):
            if message.get("type") == "websocket.send" and '"op":"event"' in message["text"]:
                steps.append(("sent", json.loads(message["text"])["seq"], 1))
            await send(message)

        return await inner(scope, receive, noting)

    return application


async def test_long_replay_streams_in_batches(settings, monkeypatch):
    settings.REALTIME = {"REPLAY_BATCH": 100}
    import realtime as rt

    owner = await db(UserFactory)()

    def emit_many():
        for n in range(1_050):
            rt.emit(f"user:{owner.pk}", "v1:tick.happened", {"n": n})

    await db(emit_many)()
    original = realtime.replay.read_typed_after
    sizes = []
    # In the order they happen: ("read", after, rows) per batch, ("sent", seq, 1) per frame.
    steps: list[tuple[str, int, int]] = []

    def counting(stream, after, limit):
        assert limit == 100  # the query itself is bounded, not sliced afterwards
        rows = original(stream, after, limit)
        sizes.append(len(rows))
        steps.append(("read", after, len(rows)))
        return rows

    monkeypatch.setattr(realtime.replay, "read_typed_after", counting)
    client = RealtimeClient(recording_sends(steps), session_key=await db(session_for)(owner))
    await client.connect()
    reply = await client.subscribe(f"user:{owner.pk}", since=0)
    assert reply["data"] == {"seq": 1_050, "epoch": reply["data"]["epoch"], "recovered": True}
    seqs = await receive_seqs(client, 1_050)
    assert seqs == list(range(1, 1_051))
    assert max(sizes) == 100
    assert len(sizes) == 11
    # Streamed: every frame of the first batch was sent before the third batch was read ...
    third_read = steps.index(("read", 200, 100))
    sent_before = {seq for step, seq, _ in steps[:third_read] if step == "sent"}
    assert set(range(1, 101)) <= sent_before
    # ... and never more than two batches (one being sent, one read ahead) were read and
    # not yet sent: a replay that read the whole history first would hold all 1,050.
    held = most = 0
    for step, _value, count in steps:
        held += count if step == "read" else -count
        most = max(most, held)
    assert 100 <= most <= 200, most
    assert held == 0
    await client.close()


async def test_subscribe_without_since_gets_only_what_commits_afterwards():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(ItemFactory)(project=project)
    client = await connected(owner)
    reply = await client.subscribe(f"project:{project.pk}")
    assert reply["data"]["recovered"] is False
    assert reply["data"]["seq"] == 2
    assert await client.nothing_more()
    await db(ItemFactory)(project=project)
    assert await receive_seqs(client, 1) == [3]
    await client.close()


async def test_since_beyond_the_newest_seq_is_not_recovered():
    owner = await db(UserFactory)()
    client = await connected(owner)
    reply = await client.subscribe(f"user:{owner.pk}", since=50)
    assert reply["data"] == {"seq": 0, "epoch": None, "recovered": False}
    await client.close()


async def test_client_that_answers_pings_survives_a_replay_larger_than_its_credit(settings):
    settings.REALTIME = {"MAX_UNACKED_BYTES": 3000, "REPLAY_BATCH": 10}
    import realtime as rt

    owner = await db(UserFactory)()

    def emit_many():
        for n in range(200):
            rt.emit(f"user:{owner.pk}", "v1:tick.happened", {"n": n, "pad": "x" * 40})

    await db(emit_many)()
    client = await connected(owner)
    await client.send({"op": "subscribe", "ref": "s", "stream": f"user:{owner.pk}", "since": 0})
    seqs = []
    while len(seqs) < 200:
        frame = await client.receive()
        assert frame.get("type") != "websocket.close", f"closed after {len(seqs)}: {frame}"
        if frame.get("op") == "ping":
            await client.send({"op": "pong"})
        elif frame.get("op") == "event":
            seqs.append(frame["seq"])
    assert seqs == list(range(1, 201))
    await client.close()


class RecordingSink:
    """What a Subscription delivers to, recording the frames (and the seqs of events)."""

    connection_id = "me"
    user = None
    transport = "websocket"

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.seqs: list[int] = []

    def send_event(self, stream: str, seq: int, event_type: str, frame: str) -> None:
        self.frames.append(frame)
        self.seqs.append(seq)

    def send_ephemeral(self, stream: str, event_type: str, frame: str) -> None:
        self.frames.append(frame)


async def test_ephemeral_events_during_a_replay_are_held_then_sent_in_order():
    from realtime.consumers import Subscription
    from realtime.policies import stream_kinds

    sink = RecordingSink()
    subscription = Subscription(sink, "project:1", stream_kinds.get("project"), None)
    subscription.contiguous = 4

    def ephemeral(name: str, origin: str = "other") -> dict:
        return {"ephemeral": True, "origin": origin, "eventType": name, "frames": {"*": name}}

    subscription.deliver(ephemeral("presence.joined"))  # during the replay
    subscription.deliver({"seq": 5, "frames": {"v1": "event 5"}, "eventType": "v1:x"})
    subscription.deliver(ephemeral("own typing", origin="me"))  # never back to its sender
    subscription.deliver(ephemeral("presence.left"))
    assert sink.frames == []
    subscription.go_live()
    # A presence diff dropped during the replay would leave the member list wrong for good.
    assert sink.frames == ["presence.joined", "event 5", "presence.left"]


async def test_seqs_given_up_on_count_every_later_one_already_delivered():
    from realtime import consumers
    from realtime.consumers import Subscription
    from realtime.policies import stream_kinds

    sink = RecordingSink()
    subscription = Subscription(sink, "project:1", stream_kinds.get("project"), None)
    assert subscription.replaying  # no resync: the bound is all that stops the wait
    subscription.contiguous = 1
    last = 4 * consumers._DUPLICATE_WINDOW + 3
    for seq in range(3, last + 1):  # seq 2 never comes
        subscription.emit(seq, {"v1": str(seq)})
    # Given up on 2: everything delivered above it counts, not only the lowest.
    assert subscription.contiguous == last
    assert subscription.above == set()
    subscription.emit(last + 1, {"v1": "next"})
    subscription.emit(last, {"v1": "duplicate"})
    assert subscription.contiguous == last + 1
    assert sink.seqs == list(range(3, last + 2))


@pytest.mark.parametrize("pruned_after_batch", [0, 1])
async def test_events_pruned_after_the_position_was_read_give_a_reset(
    settings, monkeypatch, pruned_after_batch
):
    """`realtime_prune` ran after the position (which covered `since`) was read: before the
    replay's first read, or between its batches."""
    from realtime.models import Event

    settings.REALTIME = {**settings.REALTIME, "REPLAY_BATCH": 2}
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for _ in range(8):
        await db(ItemFactory)(project=project)
    stream = f"project:{project.pk}"
    original = realtime.replay.read_typed_after
    reads = []

    def pruning_read(name, after, limit):
        if len(reads) == pruned_after_batch:
            Event.objects.filter(stream__name=name, seq__lte=6).delete()
        reads.append(after)
        return original(name, after, limit)

    monkeypatch.setattr(realtime.replay, "read_typed_after", pruning_read)
    client = await connected(owner)
    reply = await client.subscribe(stream, since=1)
    assert reply["data"]["recovered"] is True  # the log covered `since` when it was read
    got = []
    while (frame := await client.receive())["op"] in ("event", "ping"):
        if frame["op"] == "event":
            got.append(frame["seq"])
    # What the log gave before the hole, then a reset at the stream's position: the client
    # refetches instead of applying the rest on a state that lacks what was pruned.
    assert got == ([] if pruned_after_batch == 0 else [2, 3])
    now = reply["data"]["seq"]  # the project's creation and the 8 items
    assert frame == {"op": "reset", "stream": stream, "epoch": reply["data"]["epoch"], "seq": now}
    assert await client.nothing_more(0.3)
    await db(ItemFactory)(project=project)
    assert await receive_seqs(client, 1) == [now + 1]
    await client.close()


async def test_every_remaining_event_pruned_before_the_replay_read_gives_a_reset(monkeypatch):
    """The position covered `since`; then `realtime_prune` deleted every event of the stream
    before the replay's first read. That read finds nothing, and no later row shows the hole:
    the events between `since` and the position must still be said lost."""
    from realtime.models import Event

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for _ in range(8):
        await db(ItemFactory)(project=project)
    stream = f"project:{project.pk}"
    original = realtime.replay.read_typed_after
    reads = []

    def pruning_read(name, after, limit):
        if not reads:
            Event.objects.filter(stream__name=name).delete()
        reads.append(after)
        return original(name, after, limit)

    monkeypatch.setattr(realtime.replay, "read_typed_after", pruning_read)
    client = await connected(owner)
    reply = await client.subscribe(stream, since=1)
    assert reply["data"]["recovered"] is True
    now = reply["data"]["seq"]
    assert now == 9  # the project's creation and the 8 items
    frame = await client.receive_until("reset")
    assert frame == {"op": "reset", "stream": stream, "epoch": reply["data"]["epoch"], "seq": now}
    assert await client.nothing_more(0.3)
    await db(ItemFactory)(project=project)
    assert await receive_seqs(client, 1) == [now + 1]
    await client.close()


async def test_a_resync_that_finds_every_missed_event_pruned_gives_a_reset():
    """Live events the layer lost, pruned before the resync (tail check, stall) read the log:
    a reset, once, not a subscription left behind that the tail check resyncs for ever."""
    from realtime.fanout import get_hub
    from realtime.models import Event, Stream

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    client = await connected(owner)
    reply = await client.subscribe(stream)
    [subscription] = get_hub().members[stream]
    assert subscription.contiguous == reply["data"]["seq"]
    now = reply["data"]["seq"] + 3

    def lost_then_pruned() -> None:
        # Three events this subscription never got (the layer lost them), then a prune.
        Stream.objects.filter(name=stream).update(last_seq=now)
        Event.objects.filter(stream__name=stream).delete()

    await db(lost_then_pruned)()
    subscription.resync()  # as the tail check does for a subscription behind the log
    frame = await client.receive_until("reset")
    assert (frame["stream"], frame["seq"]) == (stream, now)
    assert subscription.contiguous == now
    assert await client.nothing_more(0.3)
    await client.close()


async def test_twenty_subscriptions_resyncing_at_once_read_the_user_once(monkeypatch):
    """A layer that answers again resyncs every subscription of a socket at once: one
    reload of the user (and its session) for all of them, not one each."""
    from realtime import policies
    from realtime.fanout import get_hub

    owner = await db(UserFactory)()
    projects = [await db(ProjectFactory)(owner=owner) for _ in range(20)]
    client = await connected(owner)
    for project in projects:
        assert (await client.subscribe(f"project:{project.pk}"))["ok"] is True
    subscriptions = [next(iter(get_hub().members[f"project:{p.pk}"])) for p in projects]
    await asyncio.sleep(0.3)  # any permission message of the projects' creation is decided
    original, reloads = policies.reload_user, []

    def counting(user):
        reloads.append(user.pk)
        return original(user)

    monkeypatch.setattr(policies, "reload_user", counting)
    for subscription in subscriptions:  # as the hub does when the layer answers again
        subscription.resync()
    for _ in range(250):
        if not any(s.replaying for s in subscriptions):
            break
        await asyncio.sleep(0.02)
    assert not any(s.replaying for s in subscriptions)
    assert reloads == [owner.pk]
    await db(ItemFactory)(project=projects[-1])  # live again, every one of them
    event = await client.receive_until("event")
    assert event["stream"] == f"project:{projects[-1].pk}"
    # A later resync reads the user again: only resyncs under way at once share a read.
    subscriptions[0].resync()
    for _ in range(250):
        if not subscriptions[0].replaying:
            break
        await asyncio.sleep(0.02)
    assert reloads == [owner.pk, owner.pk]
    await client.close()


async def test_an_unsubscribe_during_a_replay_comes_after_the_events_sent_and_ends_them(settings):
    """docs/protocol.md section 2: frames are read while a replay runs; an unsubscribe cuts it
    short, and nothing of the stream follows its reply."""
    import realtime as rt

    settings.REALTIME = {**settings.REALTIME, "REPLAY_BATCH": 10}
    owner = await db(UserFactory)()
    stream = f"user:{owner.pk}"

    def emit_many():
        for n in range(300):
            rt.emit(stream, "v1:tick.happened", {"n": n})

    await db(emit_many)()
    client = await connected(owner)
    await client.send({"op": "subscribe", "ref": "s", "stream": stream, "since": 0})
    await client.send({"op": "unsubscribe", "ref": "u", "stream": stream})
    frames = []
    while True:
        frame = await client.receive()
        if frame.get("op") == "ping":
            continue
        frames.append(frame)
        if frame.get("ref") == "u":
            break
    assert frames[0]["ref"] == "s"
    assert frames[0]["ok"] is True
    assert frames[-1] == {"op": "reply", "ref": "u", "ok": True, "data": {}}
    seqs = [f["seq"] for f in frames[1:-1]]
    assert all(f["op"] == "event" for f in frames[1:-1])
    assert seqs == list(range(1, len(seqs) + 1))  # in order, from the start, no gap
    assert await client.nothing_more(0.5)  # nothing of the stream after the reply
    await client.close()


async def test_events_that_are_not_logged_survive_a_replay_buffer_overflow(settings):
    from realtime.consumers import Subscription
    from realtime.policies import stream_kinds

    settings.REALTIME = {**settings.REALTIME, "REPLAY_BUFFER": 4}
    sink = RecordingSink()
    subscription = Subscription(sink, "project:1", stream_kinds.get("project"), None)
    subscription.contiguous = 4

    def ephemeral(name: str) -> dict:
        return {"ephemeral": True, "origin": "other", "eventType": name, "frames": {"*": name}}

    subscription.deliver(ephemeral("presence.joined"))
    for seq in range(5, 10):  # past the bound: the logged ones are read from the log again
        subscription.deliver({"seq": seq, "frames": {"v1": f"event {seq}"}, "eventType": "v1:x"})
    subscription.deliver(ephemeral("presence.left"))
    assert subscription.overflowed
    subscription.go_live()
    # The log gives back no presence change: one dropped here would leave the member list
    # wrong until that member next joins or leaves.
    assert sink.frames[0] == "presence.joined"
    assert "presence.left" in sink.frames
    assert len(subscription.buffer) == 0


async def test_a_flood_of_events_that_are_not_logged_during_a_replay_stays_bounded(settings):
    from realtime.consumers import Subscription
    from realtime.policies import stream_kinds

    settings.REALTIME = {**settings.REALTIME, "REPLAY_BUFFER": 10}
    subscription = Subscription(RecordingSink(), "project:1", stream_kinds.get("project"), None)
    for n in range(1000):
        subscription.deliver({"ephemeral": True, "origin": "x", "frames": {"*": f"typing {n}"}})
        assert len(subscription.buffer) <= 10
    assert subscription.buffer[-1]["frames"]["*"] == "typing 999"  # the newest are kept
