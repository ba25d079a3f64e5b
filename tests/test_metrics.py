"""Prometheus metrics: counters move under a scripted session; the exposition is protected;
several processes add up under PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import Client, override_settings
from django.utils import timezone
from prometheus_client import REGISTRY

from board.membership import add_member
from realtime.cursor import Position, encode
from realtime.testing import RealtimeClient, flush, session_for

from .factories import ItemFactory, ProjectFactory, UserFactory

db = sync_to_async
ROOT = Path(__file__).resolve().parent.parent


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Deltas:
    """Sample values now, and how much each moved later."""

    NAMES = [
        ("realtime_connects_total", {"transport": "websocket"}),
        ("realtime_connections", {"transport": "websocket"}),
        ("realtime_resumes_total", {"transport": "websocket"}),
        ("realtime_events_replayed_total", {"transport": "websocket"}),
        ("realtime_unauthorized_attempts_total", {"action": "subscribe"}),
        ("realtime_unauthorized_attempts_total", {"action": "publish"}),
        ("realtime_dropped_total", {"reason": "rate_limit"}),
        ("realtime_dropped_total", {"reason": "malformed"}),
        ("realtime_dropped_total", {"reason": "oversize"}),
        ("realtime_dropped_total", {"reason": "unauthorized"}),
        ("realtime_events_published_total", {}),
        ("realtime_events_delivered_total", {}),
        ("realtime_publish_to_fanout_seconds_count", {}),
        ("realtime_disconnects_total", {"code": "4413"}),
        ("realtime_refused_connections_total", {"code": "4401"}),
    ]

    def __init__(self) -> None:
        self.start = {self.key(n, lb): value(n, **lb) for n, lb in self.NAMES}

    @staticmethod
    def key(name: str, labels: dict[str, str]) -> str:
        return name + (
            "{" + ",".join(f"{k}={v}" for k, v in labels.items()) + "}" if labels else ""
        )

    def moved(self) -> dict[str, float]:
        return {
            self.key(n, lb): value(n, **lb) - self.start[self.key(n, lb)] for n, lb in self.NAMES
        }


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_counters_follow_a_scripted_session(settings):
    # A bucket that does not refill during the test: 20 publishes pass, the rest are refused,
    # however slowly a loaded machine runs the loop below (at 10/s it refilled 1-2 tokens).
    settings.REALTIME = {**settings.REALTIME, "PUBLISH_RATE": 0.001, "PUBLISH_BURST": 20}
    owner = await db(UserFactory)()
    stranger_project = await db(ProjectFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(ItemFactory)(project=project, title="old one")
    await db(flush)()
    deltas = Deltas()

    refused = RealtimeClient()
    assert (await refused.connect())["code"] == 4401

    client = RealtimeClient(session_key=await db(session_for)(owner))
    await client.connect()
    assert (await client.subscribe(f"project:{stranger_project.pk}"))["ok"] is False
    reply = await client.subscribe(f"project:{project.pk}", since=0)
    assert reply["data"]["recovered"] is True
    await client.receive_until("event")
    await client.receive_until("event")  # the project's and the item's created events
    # A server event's type, forged: refused, and counted as an unauthorized publish.
    not_allowed = await client.request(
        "publish", stream=f"project:{project.pk}", type="v1:item.deleted", data={"id": 1}
    )
    assert not_allowed["error"]["code"] == "event_not_allowed"
    refusals = 0
    for _ in range(24):  # burst 20, one taken by the forged publish: the rest are rate limited
        answer = await client.request(
            "publish", stream=f"project:{project.pk}", type="v1:typing.started", data={}
        )
        refusals += not answer["ok"]
    assert refusals == 5
    await client.send("{not json")
    await client.receive_until("reply")
    await db(ItemFactory)(project=project, title="live one")
    live = await client.receive_until("event")
    assert live["data"]["title"] == "live one"
    await client.send("x" * (70 * 1024))  # over MAX_FRAME_BYTES: closed with 4413
    closed = await client.receive_until("never")
    assert closed["code"] == 4413
    await client.close()

    moved = Deltas.moved(deltas)
    assert moved["realtime_refused_connections_total{code=4401}"] == 1
    assert moved["realtime_connects_total{transport=websocket}"] == 1
    assert moved["realtime_connections{transport=websocket}"] == 0  # up, then down again
    assert moved["realtime_unauthorized_attempts_total{action=subscribe}"] == 1
    assert moved["realtime_unauthorized_attempts_total{action=publish}"] == 1  # the forged type
    assert moved["realtime_resumes_total{transport=websocket}"] == 1
    assert moved["realtime_events_replayed_total{transport=websocket}"] == 2
    assert moved["realtime_dropped_total{reason=rate_limit}"] == refusals
    assert moved["realtime_dropped_total{reason=unauthorized}"] == 2  # forbidden + not allowed
    assert moved["realtime_dropped_total{reason=malformed}"] == 1
    assert moved["realtime_dropped_total{reason=oversize}"] == 1
    assert moved["realtime_events_published_total"] >= 1
    assert moved["realtime_events_delivered_total"] >= 1
    assert moved["realtime_publish_to_fanout_seconds_count"] >= 1
    assert moved["realtime_disconnects_total{code=4413}"] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_refused_http_reads_and_slow_sse_clients_are_counted(monkeypatch):
    from django.test import AsyncClient

    import realtime
    from realtime import sse
    from realtime.fanout import get_hub

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)()

    def reads() -> float:
        return value("realtime_unauthorized_attempts_total", action="read")

    def slow() -> float:
        return value("realtime_dropped_total", reason="slow_consumer")

    before = reads(), slow()
    client = AsyncClient()
    await client.aforce_login(owner)
    stream = {"streams": f"project:{project.pk}"}
    assert (await client.get("/realtime/sse/", stream)).status_code == 403
    assert (await client.get("/api/realtime/events/", stream)).status_code == 403
    assert (await client.get(f"/api/presence/project:{project.pk}/")).status_code == 403
    assert reads() - before[0] == 3

    monkeypatch.setattr(sse, "MAX_QUEUED", 2)
    response = await client.get("/realtime/sse/", {"streams": f"user:{owner.pk}"})
    body = response.streaming_content.__aiter__()
    await body.__anext__()  # retry: the stream is open
    assert (await body.__anext__()).startswith(b"id: ")  # where the stream starts
    reading = asyncio.ensure_future(body.__anext__())  # past the replay, to the live events
    [subscription] = get_hub().members[f"user:{owner.pk}"]
    for _ in range(100):
        if not subscription.replaying:
            break
        await asyncio.sleep(0.02)
    await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": 0})
    assert b'"n":0' in await asyncio.wait_for(reading, 5)
    for n in range(1, 4):  # nobody reads from here on
        await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": n})
    await db(flush)()
    for _ in range(50):
        if slow() > before[1]:
            break
        await asyncio.sleep(0.05)
    assert slow() - before[1] == 3  # the two queued and the one that did not fit
    await body.aclose()


@pytest.mark.django_db
def test_exposition_is_for_staff_or_the_bearer_token():
    staff = UserFactory(is_staff=True)
    member = UserFactory()
    assert Client().get("/realtime/metrics").status_code == 401
    plain = Client()
    plain.force_login(member)
    assert plain.get("/realtime/metrics").status_code == 403
    ops = Client()
    ops.force_login(staff)
    response = ops.get("/realtime/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    for name in ("realtime_connections", "realtime_connects_total", "realtime_relay_backlog"):
        assert name in text
    with override_settings(REALTIME={"METRICS_TOKEN": "s3cret-token"}):
        bearer = Client(headers={"Authorization": "Bearer s3cret-token"})
        assert bearer.get("/realtime/metrics").status_code == 200
        wrong = Client(headers={"Authorization": "Bearer nope"})
        assert wrong.get("/realtime/metrics").status_code == 403
    no_token = Client(headers={"Authorization": "Bearer s3cret-token"})
    assert no_token.get("/realtime/metrics").status_code == 403  # no token configured


@pytest.mark.django_db
def test_relay_backlog_counts_unpublished_events():
    from realtime.metrics import exposition
    from realtime.models import Event

    project = ProjectFactory()
    add_member(project, UserFactory())
    Event.objects.update(published_at=timezone.now())
    Event.objects.filter(pk__in=Event.objects.order_by("pk").values("pk")[:2]).update(
        published_at=None
    )
    text = exposition()[0].decode()
    line = next(x for x in text.splitlines() if x.startswith("realtime_relay_backlog "))
    assert float(line.split()[1]) == 2.0


CHILD = """
import os, sys
sys.path.insert(0, {root!r})
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
from realtime import metrics
metrics.CONNECTS.labels("websocket").inc(int(sys.argv[1]))
metrics.CONNECTIONS.labels("websocket").inc()
print(os.getpid())
if sys.argv[2] == "print":
    import django
    django.setup()
    from unittest import mock
    with mock.patch("realtime.metrics._Backlog.collect", return_value=[]):
        print(metrics.exposition()[0].decode())
"""


def test_values_of_several_processes_add_up_in_multiprocess_mode(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    script = CHILD.format(root=str(ROOT))
    for n in (2, 3):
        done = subprocess.run(
            [sys.executable, "-c", script, str(n), "-"],
            env=env,
            check=True,
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert int(done.stdout.split()[0]) > 0  # it ran, and has exited
    done = subprocess.run(
        [sys.executable, "-c", script, "4", "print"],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in done.stdout.splitlines()[1:]
        if line and not line.startswith("#")
    }
    assert lines['realtime_connects_total{transport="websocket"}'] == 9.0
    # Live connections count only processes that are alive: the exposition forgets the
    # files of the two that exited.
    assert lines.get('realtime_connections{transport="websocket"}') == 1.0


@pytest.mark.django_db
def test_realtime_stats_reads_the_subscriptions_row_by_row():
    """20,000 sockets of 100 streams each must not all be in memory for one screen."""
    import tracemalloc

    from realtime.management.commands.realtime_stats import Command
    from realtime.models import Connection

    streams = [f"project:{n}" for n in range(50)]
    now = timezone.now()
    Connection.objects.bulk_create(
        Connection(id=f"c{n}", node=f"node:{n % 2}", last_seen=now, subscriptions=streams)
        for n in range(4000)
    )
    tracemalloc.start()
    try:
        screen = Command().screen(3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "live connections: 4000" in screen
    assert "node:1" in screen
    assert screen.count("4000 subscriber(s)") == 3
    assert peak < 5 * 1024 * 1024  # all the lists at once took 17 MiB


@pytest.mark.django_db
@pytest.mark.parametrize("args", [["--watch", "-1"], ["--top", "0"], ["--count", "-1"]])
def test_realtime_stats_rejects_bad_arguments(args):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError):
        call_command("realtime_stats", *args)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("heartbeat", "age", "stale"),
    [(10.0, 25, True), (100.0, 95, False), (25.0, 60, True), (25.0, 30, False)],
)
def test_realtime_stats_calls_rows_stale_after_two_missed_heartbeats(
    settings, heartbeat, age, stale
):
    """A live node refreshes its rows every HEARTBEAT; not the default's 90 s whatever it is."""
    import datetime as dt

    from realtime.management.commands.realtime_stats import Command
    from realtime.models import Connection

    settings.REALTIME = {"HEARTBEAT": heartbeat, "CONNECTION_SWEEP_AFTER": 3 * heartbeat}
    seen = timezone.now() - dt.timedelta(seconds=age)
    Connection.objects.create(id="c1", node="n:1", last_seen=seen)
    screen = Command().screen(3)
    assert (f"1 row(s) not seen for {2 * heartbeat:g} s" in screen) is stale
    assert ("not seen for" in screen) is stale


def test_help_of_unauthorized_attempts_names_every_action_counted():
    from realtime.metrics import exposition

    text = exposition()[0].decode()
    help_line = next(
        line for line in text.splitlines() if line.startswith("# HELP realtime_unauthorized")
    )
    for action in ("subscribe", "publish", "read"):
        assert action in help_line


@pytest.mark.django_db(transaction=True)
def test_publish_delay_runs_from_the_events_timestamp_live_and_through_the_relay(monkeypatch):
    import datetime as dt
    import time

    from django.db.models import F

    import realtime
    from realtime.log import relay_once
    from realtime.models import Event
    from realtime.publisher import publisher

    def delay(path: str) -> float:
        return value("realtime_publish_delay_seconds_sum", path=path)

    live, relayed = delay("live"), delay("relay")
    real_submit = publisher.submit

    def slow_submit(items: Any) -> None:  # the event waits before the publisher's queue
        time.sleep(0.3)
        real_submit(items)

    monkeypatch.setattr(publisher, "submit", slow_submit)
    realtime.emit("user:delay", "v1:tick.happened", {})
    flush()
    assert delay("live") - live >= 0.3
    monkeypatch.setattr(publisher, "submit", lambda items: None)  # the live publish is lost
    realtime.emit("user:delay", "v1:tick.happened", {})
    Event.objects.filter(stream__name="user:delay", seq=2).update(
        timestamp=F("timestamp") - dt.timedelta(seconds=3)
    )
    assert relay_once(grace=0).published == 1
    assert delay("relay") - relayed >= 3  # the relay's lag is what operators need to see
    assert delay("live") - live < 3


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_reconnects_are_the_accepted_sockets_whose_client_says_so():
    user = await db(UserFactory)()
    session = await db(session_for)(user)

    def reconnects() -> float:
        return value("realtime_reconnects_total", transport="websocket")

    before = reconnects()
    refused = RealtimeClient(path="/ws/realtime/?reconnect=1")  # no session: 4401
    assert (await refused.connect())["code"] == 4401
    for path in ("/ws/realtime/?v=js-1", "/ws/realtime/?v=js-1&reconnect=0"):
        first = RealtimeClient(path=path, session_key=session)
        await first.connect()
        await first.close()
    assert reconnects() == before
    again = RealtimeClient(path="/ws/realtime/?v=js-1&reconnect=1", session_key=session)
    await again.connect()
    await again.close()
    assert reconnects() == before + 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_sse_reconnects_are_the_streams_whose_client_says_so_or_sends_last_event_id():
    from .test_sse import open_sse

    user = await db(UserFactory)()
    stream = f"user:{user.pk}"

    def counted() -> tuple[float, float]:
        return (
            value("realtime_connects_total", transport="sse"),
            value("realtime_reconnects_total", transport="sse"),
        )

    async def opened(last_event_id: str | None = None, **query: str) -> None:
        reader, _ = await open_sse(user, stream, last_event_id, **query)  # counted by its `retry:`
        await reader.close()

    before = counted()
    await opened()
    await opened(reconnect="0")
    assert counted() == (before[0] + 2, before[1])
    await opened(reconnect="1")
    cursor = encode({stream: Position(0, None)})
    await opened(last_event_id=cursor)  # EventSource's own retry
    assert counted() == (before[0] + 4, before[1] + 2)
