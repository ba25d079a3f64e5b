"""The hub's tail check: a logged event the layer lost, with none after it, still arrives."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

import realtime
from realtime import fanout, metrics
from realtime.consumers import Subscription
from realtime.fanout import Hub, get_hub
from realtime.models import Stream
from realtime.streams import group_name
from realtime.testing import RealtimeClient, session_for

from .factories import UserFactory
from .test_sse import open_sse

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async

INTERVAL = 0.3


def emit(stream: str, count: int = 1) -> None:
    for n in range(count):
        realtime.emit(stream, "v1:tick.happened", {"n": n})


def resyncs() -> float:
    return float(metrics.TAIL_RESYNCS._value.get())


async def eventually(condition: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.01)


def lose_next(monkeypatch: pytest.MonkeyPatch, stream: str) -> list[dict[str, Any]]:
    """Make the layer lose the next message of `stream` without an error, as pub/sub does
    across a short reconnect: the publisher counts it as sent, so the relay never sends it."""
    layer = get_channel_layer()
    real = layer.group_send
    lost: list[dict[str, Any]] = []

    async def group_send(group: str, message: dict[str, Any]) -> None:
        if not lost and group == group_name(stream):
            lost.append(message)
            return
        await real(group, message)

    monkeypatch.setattr(layer, "group_send", group_send)
    return lost


def record_reads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, int]]:
    """Record what each tail check read from the log."""
    reads: list[dict[str, int]] = []
    real = fanout._last_seqs

    def reading(streams: list[str]) -> dict[str, int]:
        seqs = real(streams)
        reads.append(seqs)
        return seqs

    monkeypatch.setattr(fanout, "_last_seqs", reading)
    return reads


async def subscribed_client() -> tuple[str, RealtimeClient]:
    owner: Any = await db(UserFactory)()
    stream = f"user:{owner.pk}"
    client = RealtimeClient(session_key=await db(session_for)(owner))
    await client.connect()
    assert (await client.subscribe(stream))["ok"]
    return stream, client


async def test_an_event_the_layer_lost_with_none_after_it_arrives_within_two_intervals(
    settings, monkeypatch
):
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": INTERVAL}
    stream, client = await subscribed_client()
    await db(emit)(stream)
    assert (await client.receive_until("event"))["seq"] == 1
    before = resyncs()

    lost = lose_next(monkeypatch, stream)
    await db(emit)(stream)
    committed = time.monotonic()
    await eventually(lambda: lost)  # the publisher handed it over; the layer dropped it
    frame = await client.receive_until("event", timeout=5)
    waited = time.monotonic() - committed
    assert frame["seq"] == 2
    assert waited < 2 * INTERVAL + 0.5, waited  # a check to see it, the next to act on it
    assert resyncs() == before + 1
    assert await client.nothing_more(2 * INTERVAL)  # once, not at every check after it

    await db(emit)(stream)  # and live again
    assert (await client.receive_until("event"))["seq"] == 3
    assert await client.nothing_more(2 * INTERVAL)
    assert resyncs() == before + 1
    await client.close()


async def test_a_subscriber_that_got_everything_is_not_resynced(settings, monkeypatch):
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": 0.1}
    reads = record_reads(monkeypatch)
    calls: list[str] = []
    real_resync = Subscription.resync

    def counting(self: Subscription) -> None:
        calls.append(self.stream)
        real_resync(self)

    monkeypatch.setattr(Subscription, "resync", counting)
    stream, client = await subscribed_client()
    await db(emit)(stream, 3)
    assert [(await client.receive_until("event"))["seq"] for _ in range(3)] == [1, 2, 3]
    before, read_before = resyncs(), len(reads)
    assert await client.nothing_more(0.6)  # no duplicate frame
    assert len(reads) - read_before >= 3  # the checks did run, and saw the stream's position
    assert reads[-1].get(stream) == 3
    assert calls == []
    assert resyncs() == before
    await client.close()


async def test_an_event_still_on_its_way_at_a_check_is_given_an_interval(settings, monkeypatch):
    """Compared with the previous check's read, not the current one: an event published a
    moment before a check is not taken for lost."""
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": INTERVAL}
    reads = record_reads(monkeypatch)
    stream, client = await subscribed_client()
    layer = get_channel_layer()
    real = layer.group_send
    gate = asyncio.Event()

    async def held(group: str, message: dict[str, Any]) -> None:
        if group == group_name(stream):
            await gate.wait()  # a slow layer: in flight while a check reads the log
        await real(group, message)

    monkeypatch.setattr(layer, "group_send", held)
    before = resyncs()
    await db(emit)(stream)
    await eventually(lambda: any(read.get(stream) == 1 for read in reads))
    gate.set()
    assert (await client.receive_until("event"))["seq"] == 1
    checks = len(reads)
    await eventually(lambda: len(reads) >= checks + 2)  # two more checks after it arrived
    assert resyncs() == before
    assert await client.nothing_more(0.1)
    await client.close()


@pytest.mark.parametrize("off", [None, 0])
async def test_the_tail_check_is_off_with_none_or_zero(settings, monkeypatch, off):
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": off}
    reads = record_reads(monkeypatch)
    stream, client = await subscribed_client()
    before = resyncs()
    lost = lose_next(monkeypatch, stream)
    await db(emit)(stream)
    await eventually(lambda: lost)
    assert await client.nothing_more(1.0)  # lost until the stream's next event
    assert reads == []
    assert resyncs() == before
    await db(emit)(stream)  # the next one arrives, and seq 1 is only a gap before it
    assert (await client.receive_until("event"))["seq"] == 2
    assert await client.nothing_more(0.5)
    await client.close()


async def test_an_sse_stream_gets_an_event_the_layer_lost(settings, monkeypatch):
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": INTERVAL}
    owner = await db(UserFactory)()
    stream = f"user:{owner.pk}"
    reader, _opened = await open_sse(owner, stream)
    await db(emit)(stream)
    assert (await reader.event("v1:tick.happened"))["data"]["seq"] == 1
    before = resyncs()
    lost = lose_next(monkeypatch, stream)
    await db(emit)(stream)
    await eventually(lambda: lost)
    assert (await reader.event("v1:tick.happened"))["data"]["seq"] == 2
    assert resyncs() == before + 1
    await reader.close()


class Fake:
    """A hub subscriber with a position, or without one (as the long poll's waker)."""

    def __init__(self, contiguous: int | None, *, replaying: bool = False) -> None:
        if contiguous is not None:
            self.contiguous = contiguous
        self.replaying = replaying
        self.resyncs = 0

    def deliver(self, message: dict[str, Any]) -> None:
        pass

    def resync(self) -> None:
        self.resyncs += 1


async def test_only_live_subscribers_behind_the_previous_check_are_resynced(settings):
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": 0.05}
    await db(Stream.objects.create)(name="user:tail-a", last_seq=5)
    await db(Stream.objects.create)(name="user:tail-b", last_seq=2)
    behind, caught_up, replaying, waker = Fake(4), Fake(5), Fake(0, replaying=True), Fake(None)
    ahead, unlogged = Fake(2), Fake(0)  # stream b; and a stream with no row yet
    hub = Hub(asyncio.get_running_loop())
    hub.members = {  # type: ignore[assignment]
        "user:tail-a": {behind, caught_up, replaying, waker},
        "user:tail-b": {ahead},
        "user:tail-none": {unlogged},
    }
    before = resyncs()
    task = asyncio.get_running_loop().create_task(hub._tail_check())
    try:
        await eventually(lambda: behind.resyncs > 0)
        await asyncio.sleep(0.2)  # several more checks
    finally:
        task.cancel()
    assert behind.resyncs >= 1
    assert resyncs() - before == behind.resyncs  # each one counted
    assert [caught_up.resyncs, replaying.resyncs, waker.resyncs] == [0, 0, 0]
    assert [ahead.resyncs, unlogged.resyncs] == [0, 0]


async def test_the_check_reads_many_streams_in_a_query_per_chunk(monkeypatch):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    names = [f"user:tail-{n}" for n in range(25)]
    rows = [Stream(name=name, last_seq=n) for n, name in enumerate(names)]
    await db(Stream.objects.bulk_create)(rows)
    monkeypatch.setattr(fanout, "TAIL_CHUNK", 10)

    def read() -> tuple[dict[str, int], int]:
        with CaptureQueriesContext(connection) as queries:
            seqs = fanout._last_seqs([*names, "user:no-row"])
        return seqs, len(queries)

    seqs, queries = await db(read)()
    assert seqs == {name: n for n, name in enumerate(names)}
    assert queries == 3  # 26 names, 10 a query


async def test_the_tail_check_ends_when_the_hub_stops(settings, monkeypatch):
    """Its loop's end cancels the hub's tasks; the tail check ends with them, even while its
    read of the log is still running in a worker thread."""
    settings.REALTIME = {"TAIL_CHECK_INTERVAL": 0.05}
    started, release = threading.Event(), threading.Event()

    def slow(streams: list[str]) -> dict[str, int]:
        started.set()
        release.wait(5)
        return {}

    monkeypatch.setattr(fanout, "_last_seqs", slow)
    hub = Hub(asyncio.get_running_loop())
    hub.members = {"user:tail-stop": {Fake(0)}}  # type: ignore[assignment]
    await hub._start()
    [tail] = [task for task in hub._tasks if task.get_name() == "realtime-hub-tail"]
    try:
        await eventually(started.is_set)
        assert not tail.done()
        for task in hub._tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*hub._tasks, return_exceptions=True), 2)
    finally:
        release.set()
    assert tail.cancelled()
    assert tail not in asyncio.all_tasks()


async def test_a_hub_runs_its_tail_check_from_its_first_subscriber():
    _stream, client = await subscribed_client()
    names = [task.get_name() for task in get_hub()._tasks if not task.done()]
    assert "realtime-hub-tail" in names
    await client.close()
