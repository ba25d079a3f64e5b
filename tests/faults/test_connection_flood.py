"""Fault 6: a flood of 1,000 connections, from one user and from many users.

One daphne node on a private redis-server. Three users are connected and subscribed to their
project while this process writes an event every 50 ms. Then (a) 1,000 sockets of one user
try to connect, CONCURRENCY handshakes at a time: exactly MAX_CONNECTIONS_PER_USER are
accepted and every other one is closed with 4429 (counted by the node; this busy client may
read a few of them too late, see Flood.attempt); (b) 1,000 sockets of 50 users (20 each)
connect and subscribe to their user stream, and all are accepted. Throughout, the three
watchers get every event of their stream in order, within a liveness bound (their latency is
printed with -s). Daphne's memory is read before, at the peak and after every flood socket is
closed; after the close, the flood's `Connection` rows, Redis subscriptions and live
connections in the node's metrics are gone.
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import threading
import time
import urllib.request
from typing import Any

import pytest
import redis
import websockets
from django.contrib.auth import get_user_model

import realtime
from realtime.models import Connection
from realtime.testing import flush, session_for

from ..conftest import need
from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect, team
from .test_stalled_reader import rss_kib

# 50 times the per-user limit. (It was 2,000, 4,000 handshakes in all: 80-90 s of a suite
# that must stay well inside CI's 15 minutes; the half shows the same limits and bounds.)
FLOOD = 1_000
#: Refused sockets the server may abort before this busy client reads the refusal (see
#: Flood.attempt): 1% of the flood. Seen: 0 in most runs, 1 now and then in a full suite.
ABORTS_TOLERATED = FLOOD // 100
LIMIT = 20  # MAX_CONNECTIONS_PER_USER, the default, set explicitly for the daphne child
USERS = FLOOD // LIMIT
#: Handshakes in flight at once: a busy client. More would only queue them in daphne.
CONCURRENCY = 25
WRITE_EVERY = 0.05
#: Liveness, not speed: a watcher's event this late means the flood starved other users.
LIVENESS_SECONDS = 30.0
#: Daphne's peak growth per flood socket. Measured here: about 37 KiB (27 KiB per subscribed
#: socket, plus some 20 MB that the first burst of handshakes takes once); a 4x margin absorbs
#: allocator noise and slower machines, and still catches a per-socket buffer that grows.
KIB_PER_SOCKET = 150
METRICS_TOKEN = "flood-metrics"

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


def raise_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit; daphne, its child, inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need(hard >= needed, f"the open-file hard limit ({hard}) is below {needed}")
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Flood:
    """Sockets opened CONCURRENCY at a time, each answering the server's pings."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.gate = asyncio.Semaphore(CONCURRENCY)
        self.open: list[Any] = []
        self.keepers: list[asyncio.Task[None]] = []
        self.refused: collections.Counter[int | None] = collections.Counter()
        self.dropped: collections.Counter[int | None] = collections.Counter()  # by the server
        self.failed: collections.Counter[str] = collections.Counter()  # handshakes that broke
        self.aborted = 0  # refused, then aborted by the server before the client read it
        self.closing = False

    async def attempt(self, session: str, stream: str | None = None) -> bool:
        """Open one socket (and subscribe it to `stream`); whether it was accepted."""
        async with self.gate:
            try:
                socket = await connect(self.url, session, ping_interval=None, open_timeout=60)
            except websockets.InvalidMessage:
                # A refused socket is accepted and closed with 4429 at once. Autobahn (daphne)
                # gives the client 1 s to answer the close, then aborts the TCP connection
                # (RST), which throws away what the client had not read yet, the 101 too.
                # This client, busy with the flood, sometimes reads that late; the node's
                # refusal count (asserted below) says what the server did.
                self.aborted += 1
                return False
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                # Counted, not raised: the test then fails naming every kind it saw, instead
                # of the first one ending the flood (a rare failure needs the whole picture).
                self.failed[f"{type(exc).__name__}: {exc}"] += 1
                return False
            try:
                welcome = json.loads(await asyncio.wait_for(socket.recv(), 60))
            except websockets.ConnectionClosed as closed:
                self.refused[closed.rcvd.code if closed.rcvd else None] += 1
                return False
            assert welcome["op"] == "welcome", welcome
            if stream is not None:
                await socket.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
                while (reply := json.loads(await asyncio.wait_for(socket.recv(), 60)))[
                    "op"
                ] != "reply":
                    pass
                assert reply["ok"] is True, reply
        self.open.append(socket)
        self.keepers.append(asyncio.create_task(self.keep(socket)))
        return True

    async def keep(self, socket: Any) -> None:
        try:
            async for text in socket:
                if json.loads(text).get("op") == "ping":
                    await socket.send('{"op":"pong"}')
        except websockets.ConnectionClosed:
            pass
        if not self.closing:
            self.dropped[socket.close_code] += 1

    async def close(self) -> None:
        self.closing = True
        await asyncio.gather(*(socket.close() for socket in self.open))
        await asyncio.gather(*self.keepers)


class Watchers:
    """Users subscribed to their project before the flood, on a thread and event loop of
    their own, so the flood's client work in this process delays their reads little."""

    def __init__(self, url: str, sessions: list[str], stream: str) -> None:
        self.url, self.sessions, self.stream = url, sessions, stream
        self.seqs: list[list[int]] = [[] for _ in sessions]
        self.latencies: list[float] = []
        self.starts: list[int] = []
        self.ready = threading.Event()
        self.target: int | None = None  # events to wait for, set once the writer stopped
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            asyncio.run(self._all())
        except BaseException as exc:
            self.failure = exc
            self.ready.set()

    async def _all(self) -> None:
        sockets = []
        try:
            for session in self.sessions:
                socket = await connect(self.url, session)
                sockets.append(socket)
                while json.loads(await socket.recv())["op"] != "welcome":
                    pass
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "s", "stream": self.stream})
                )
                while (reply := json.loads(await socket.recv()))["op"] != "reply":
                    pass
                self.starts.append(reply["data"]["seq"])
            self.ready.set()
            await asyncio.gather(*(self._follow(n, s) for n, s in enumerate(sockets)))
        finally:
            for socket in sockets:
                await socket.close()

    async def _follow(self, index: int, socket: Any) -> None:
        seqs = self.seqs[index]
        while self.target is None or len(seqs) < self.target:
            try:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 1.0))
            except TimeoutError:
                continue
            if frame["op"] == "ping":
                await socket.send('{"op":"pong"}')
            elif frame["op"] == "event" and "seq" in frame:
                self.latencies.append(time.time() - frame["data"]["t"])
                seqs.append(frame["seq"] - self.starts[index])


class PatientDaphne(Daphne):
    """Daphne that waits up to a minute for the application to accept a handshake.

    Its default of 5 s drops a handshake queued that long behind the flood (on a loaded
    machine, now and then); the application still finishes it, and a client that retries
    would make the counts of this test depend on the machine's load.
    """

    def command(self) -> list[str]:
        return [
            *super().command()[:-1],
            "--websocket_connect_timeout",
            "60",
            "config.asgi:application",
        ]


def metric(node: Daphne, name: str) -> float:
    """One sample of the node's Prometheus exposition (0 when absent)."""
    request = urllib.request.Request(
        node.url("/realtime/metrics"), headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def until(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_connection_flood_is_limited_per_user_bounded_in_memory_and_spares_other_users(
    private_redis, settings, tmp_path
):
    raise_open_files(2 * (FLOOD + LIMIT) + 500)  # this process's sockets and daphne's
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    User = get_user_model()
    people = team(3)
    hog = User.objects.create(username="hog")
    User.objects.bulk_create(User(username=f"crowd{n}") for n in range(USERS))
    crowd = list(User.objects.filter(username__startswith="crowd").order_by("pk"))
    hog_session = session_for(hog)
    crowd_sessions = [session_for(user) for user in crowd]
    flood_users = [hog, *crowd]
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": private_redis.url,
        # DEBUG off: with it on, each database connection keeps its last 9,000 queries, which
        # reads as memory growth per socket. The sessions made here are signed with this key.
        "DEBUG": "0",
        "SECRET_KEY": settings.SECRET_KEY,
        # Persistent connections in daphne's threads, as in production: with 0 every query
        # of 4,000 handshakes would open a PostgreSQL connection of its own.
        "CONN_MAX_AGE": "60",
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "TEST_REALTIME": json.dumps(
            {"MAX_CONNECTIONS_PER_USER": LIMIT, "METRICS_TOKEN": METRICS_TOKEN}
        ),
        "REALTIME_LOG_LEVEL": "ERROR",  # 980 refusals would each log a warning
    }
    pubsub = redis.Redis.from_url(private_redis.url)
    with PatientDaphne(env, tmp_path / "daphne.log") as node:
        url = f"ws://127.0.0.1:{node.port}/ws/realtime/"
        pid = node.process.pid
        watchers = Watchers(url, people.sessions, people.stream)
        watchers.thread.start()
        assert watchers.ready.wait(30), "the watchers did not subscribe"
        assert watchers.failure is None, watchers.failure
        channels_before = len(pubsub.pubsub_channels())
        stop = threading.Event()
        written: list[float] = []

        def write() -> None:
            from django.db import connection

            try:
                while not stop.is_set():
                    realtime.emit(people.stream, "v1:fault.tick", {"t": time.time()})
                    written.append(time.time())
                    time.sleep(WRITE_EVERY)
                flush(timeout=30)
            finally:
                connection.close()

        def flood_rows() -> int:
            from django.db import connection

            try:
                return Connection.objects.filter(user__in=flood_users).count()
            finally:
                connection.close()

        writer = threading.Thread(target=write)
        writer.start()
        seconds: dict[str, float] = {}
        rss = {"before": rss_kib(pid)}

        async def scenario() -> tuple[Flood, Flood, int]:
            started = time.monotonic()
            one = Flood(url)
            await asyncio.gather(*(one.attempt(hog_session) for _ in range(FLOOD)))
            seconds["one user"] = time.monotonic() - started
            assert not one.failed, (one.failed, node.output()[-3000:])
            rss["after one user"] = rss_kib(pid)
            started = time.monotonic()
            many = Flood(url)
            await asyncio.gather(
                *(
                    many.attempt(crowd_sessions[n % USERS], f"user:{crowd[n % USERS].pk}")
                    for n in range(FLOOD)
                )
            )
            seconds["many users"] = time.monotonic() - started
            assert not many.failed, (many.failed, node.output()[-3000:])
            await asyncio.sleep(1.0)  # subscriptions recorded, memory settled
            rss["peak"] = rss_kib(pid)
            rows = await asyncio.to_thread(flood_rows)
            assert not one.dropped, one.dropped  # nothing accepted was closed by the server
            assert not many.dropped, many.dropped
            started = time.monotonic()
            await asyncio.gather(one.close(), many.close())
            seconds["close"] = time.monotonic() - started
            return one, many, rows

        try:
            one, many, peak_rows = asyncio.run(scenario())
        finally:
            stop.set()
            writer.join(60)
        # Everything the flood's sockets held goes when they close (no sweep: the node lives).
        until(
            lambda: not Connection.objects.filter(user__in=flood_users).exists(),
            "the flood's Connection rows were not removed",
        )
        until(
            lambda: len(pubsub.pubsub_channels()) == channels_before,
            "the flood's Redis subscriptions were not removed",
        )
        until(
            lambda: metric(node, 'realtime_connections{transport="websocket"}') == 3,
            "the node still counts the flood's connections",
        )
        refused_by_node = metric(node, 'realtime_refused_connections_total{code="4429"}')
        time.sleep(1.0)
        rss["after"] = rss_kib(pid)
        watchers.target = len(written)
        watchers.thread.join(LIVENESS_SECONDS + 10)
        assert not watchers.thread.is_alive(), [len(s) for s in watchers.seqs]
        assert watchers.failure is None, watchers.failure
        assert "Traceback" not in node.output(), node.output()[-3000:]
    pubsub.close()

    sockets = LIMIT + FLOOD
    growth = rss["peak"] - rss["before"]
    p50, p99 = percentile(watchers.latencies, 0.5), percentile(watchers.latencies, 0.99)
    print(  # shown with -s
        f"\none user: {len(one.open)} accepted, {dict(one.refused)} refused, "
        f"{one.aborted} aborted before the client read the refusal, "
        f"{seconds['one user']:.1f} s; many users: {len(many.open)} accepted and subscribed, "
        f"{seconds['many users']:.1f} s; closed in {seconds['close']:.1f} s\n"
        f"daphne RSS KiB: {rss}; {growth / sockets:.1f} KiB per socket at the peak\n"
        f"watchers: {len(written)} events each, latency p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {max(watchers.latencies) * 1000:.0f} ms"
    )
    assert len(one.open) == LIMIT  # exactly the limit, though CONCURRENCY raced for it
    assert set(one.refused) == {4429}, one.refused
    assert one.refused[4429] + one.aborted == FLOOD - LIMIT
    assert one.aborted <= ABORTS_TOLERATED, one.aborted
    assert refused_by_node == FLOOD - LIMIT  # every one of them, as the server saw it
    assert len(many.open) == FLOOD
    assert not many.refused
    assert not many.aborted
    assert peak_rows == LIMIT + FLOOD
    for seqs in watchers.seqs:  # every event, in order, once
        assert seqs == list(range(1, len(written) + 1))
    assert max(watchers.latencies) < LIVENESS_SECONDS
    assert growth < KIB_PER_SOCKET * sockets, f"daphne grew by {growth} KiB for {sockets} sockets"
    # Freed memory stays in the allocator's pools, so RSS does not fall after the close; but
    # the close takes little more (measured: 3-7% of the flood's growth, and a second flood
    # of 2,000 reused the pools without growing).
    assert rss["after"] - rss["peak"] < growth // 4, rss
