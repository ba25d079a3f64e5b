"""Fault 8: the same changes read over WebSocket, SSE and the event feed end in the same state.

Two daphne nodes share a private redis-server (never the machine's). Six readers follow two
project streams (items move between the projects): over the WebSocket, over SSE and by long
polling the event feed, one of each per node. This process makes 400 changes to board items
through the real pipeline: creates, title, done and position changes, deletes, moves
between the projects, a few atomic batches and a few rolled-back changes. Redis is killed
after change 120 and restarted 2 s later; node A gets SIGKILL after change 280 and its
readers go on through node B: the WebSocket subscribes with `since`, SSE reconnects with
`Last-Event-ID`, the poller sends its cursor again. Like the JS client, the WebSocket and
SSE readers resume from the log when a seq gap does not close by itself or they fall silent
while behind. Each reader folds what it received (item id -> latest data, a delete
removes). All six must end with the same (stream, seq, eventId) lists, which are the log's,
with no gap or duplicate after dedupe, and the same state, which is the database's; and
each resume started where the reader said it was, so the only duplicates it got are events
it held beyond that position.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import websockets
from django.db import connection, transaction

from board.membership import add_member
from board.models import Item
from board.serializers import ItemSerializer
from realtime.cursor import Position, decode, encode
from realtime.models import Event, Stream
from realtime.testing import flush

from ..factories import ProjectFactory
from ..live import Daphne, database_url
from ..test_outage import redis_layer
from ..test_sse import SSEReader
from . import connect, relay_backlog, team

CHANGES = 400
REDIS_AT = 120
DOWN_FOR = 2.0
KILL_AT = 280
GAP_WAIT = 1.5  # seconds a seq gap (or silence while behind) may last before a resume
POLL_WAIT = 3  # the long poll's `wait`

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]

LOST = (OSError, EOFError, http.client.HTTPException, websockets.ConnectionClosed)


class Rollback(Exception):
    """Raised inside a change to roll it back."""


class Reader:
    """One client's copy of the streams: events by seq (deduplicated), folded at the end."""

    transport = ""

    def __init__(self, node: str, urls: list[str], session: str, bases: dict[str, int]) -> None:
        self.name = f"{self.transport}@{node}"
        self.urls, self.session, self.bases = urls, session, bases
        self.streams = list(bases)
        self.events: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in bases}
        self.contiguous = dict(bases)  # every seq up to this one was received
        self.moved_at = {s: time.monotonic() for s in bases}
        self.duplicates = 0
        self.resent = 0  # events held beyond the positions resumed from: a resume resends them
        self.reconnects = 0  # connections lost (the killed node)
        self.resumes = 0  # gaps or silence resumed from the log
        self.node = 0

    @property
    def url(self) -> str:
        return self.urls[self.node]

    def record(self, frame: dict[str, Any]) -> None:
        stream, seq = frame["stream"], frame["seq"]
        held = self.events[stream]
        if seq <= self.bases[stream] or seq in held:
            if seq in held:  # a resend must be the same event
                assert held[seq]["eventId"] == frame["eventId"], (self.name, frame)
            self.duplicates += 1
            return
        held[seq] = frame
        while self.contiguous[stream] + 1 in held:
            self.contiguous[stream] += 1
            self.moved_at[stream] = time.monotonic()

    def done(self, target: dict[str, int]) -> bool:
        return bool(target) and all(self.contiguous[s] >= target[s] for s in self.streams)

    def stuck(self, target: dict[str, int]) -> list[str]:
        """Streams with a gap, or behind the final seq, that made no progress for a while."""
        now = time.monotonic()
        return [
            s
            for s in self.streams
            if self.contiguous[s] < max(target.get(s, 0), max(self.events[s], default=0))
            and now - self.moved_at[s] > GAP_WAIT
        ]

    def resume_from(self, positions: dict[str, int]) -> None:
        self.resent += sum(
            1 for stream, seq in positions.items() for held in self.events[stream] if held > seq
        )

    def lost(self) -> None:
        self.reconnects += 1
        self.node = (self.node + 1) % len(self.urls)

    def log(self) -> list[tuple[str, int, str]]:
        return [
            (s, seq, self.events[s][seq]["eventId"])
            for s in self.streams
            for seq in sorted(self.events[s])
        ]

    def state(self) -> dict[str, dict[int, dict[str, Any]]]:
        folded: dict[str, dict[int, dict[str, Any]]] = {}
        for stream in self.streams:
            items = folded[stream] = {}
            for seq in sorted(self.events[stream]):
                frame = self.events[stream][seq]
                if not frame["type"].startswith("v1:item."):
                    continue
                if frame["type"].endswith(".deleted"):
                    items.pop(frame["data"]["id"], None)
                else:
                    items[frame["data"]["id"]] = frame["data"]
        return folded

    async def run(self, target: dict[str, int], deadline: float) -> None:
        while not self.done(target):
            assert time.monotonic() < deadline, f"{self.name}: stuck at {self.contiguous}"
            try:
                await self.follow(target, deadline)
            except LOST:
                self.lost()
                await asyncio.sleep(0.2)

    async def follow(self, target: dict[str, int], deadline: float) -> None:
        raise NotImplementedError


class WebSocketReader(Reader):
    """Subscribes with `since`; on a gap that stays open, unsubscribes and subscribes again."""

    transport = "ws"

    async def follow(self, target: dict[str, int], deadline: float) -> None:
        async with connect(self.url, self.session, open_timeout=5, max_queue=None) as socket:
            self.socket, self.refs = socket, 0
            while (await self._frame(10)).get("op") != "welcome":
                pass
            for stream in self.streams:
                await self._subscribe(stream)
            while not self.done(target):
                assert time.monotonic() < deadline, f"{self.name}: stuck at {self.contiguous}"
                with contextlib.suppress(TimeoutError):
                    await self._frame(0.5)
                for stream in self.stuck(target):
                    self.resumes += 1
                    await self._request({"op": "unsubscribe", "stream": stream})
                    await self._subscribe(stream)

    async def _frame(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        frame = json.loads(await asyncio.wait_for(self.socket.recv(), timeout))
        if frame.get("op") == "ping":
            await self.socket.send('{"op":"pong"}')
        elif frame.get("op") == "event" and "seq" in frame:
            self.record(frame)
        return dict(frame)

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.refs += 1
        ref = str(self.refs)
        await self.socket.send(json.dumps({**frame, "ref": ref}))
        while True:
            reply = await self._frame(10)
            if reply.get("op") == "reply" and reply.get("ref") == ref:
                assert reply["ok"], (self.name, reply)
                return reply

    async def _subscribe(self, stream: str) -> None:
        since = self.contiguous[stream]
        self.resume_from({stream: since})
        reply = await self._request({"op": "subscribe", "stream": stream, "since": since})
        assert reply["data"]["recovered"], (self.name, reply)
        self.moved_at[stream] = time.monotonic()


class ChunkedBody:
    """The body of a raw HTTP/1.1 response as an async iterator of whole lines of bytes.

    Cancelling a read loses nothing (SSEReader reads under a timeout): bytes only leave the
    socket's buffer in `read()`, and the rest is decoded synchronously.
    """

    def __init__(self, reader: asyncio.StreamReader, chunked: bool) -> None:
        self.reader, self.chunked = reader, chunked
        self.raw = b""  # undecoded transfer encoding
        self.text = b""  # decoded body not yet handed out (an unfinished line)
        self.ended = False

    def __aiter__(self) -> ChunkedBody:
        return self

    async def __anext__(self) -> bytes:
        while True:
            cut = self.text.rfind(b"\n") + 1
            if cut:
                lines, self.text = self.text[:cut], self.text[cut:]
                return lines
            if self.ended:
                raise EOFError("the event stream ended")
            data = await self.reader.read(65536)
            if not data:
                raise EOFError("the event stream ended")
            if self.chunked:
                self.raw += data
                self._dechunk()
            else:
                self.text += data

    def _dechunk(self) -> None:
        while True:
            head = self.raw.find(b"\r\n")
            if head < 0:
                return
            size = int(self.raw[:head].split(b";")[0], 16)
            if size == 0:
                self.ended = True
                return
            if len(self.raw) < head + 2 + size + 2:
                return
            self.text += self.raw[head + 2 : head + 2 + size]
            self.raw = self.raw[head + 2 + size + 2 :]


class SSEClient(Reader):
    """Reads /realtime/sse/ over a raw socket; reconnects with `Last-Event-ID`.

    Like an EventSource, it keeps its URL, which starts from the test's positions with
    `?cursor=` (as the JS client does), and adds the last id it got when it reconnects. A gap
    that stays open, or silence while behind, ends the response and resumes from that id,
    which the server keeps at the last contiguous seq of every stream.
    """

    transport = "sse"

    def __init__(self, *args: Any, cursor: str) -> None:
        super().__init__(*args)
        self.cursor = cursor
        self.last_id: str | None = None

    async def follow(self, target: dict[str, int], deadline: float) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        query = {"streams": ",".join(self.streams), "cursor": self.cursor}
        headers = [f"Cookie: sessionid={self.session}", "Accept: text/event-stream"]
        if self.last_id is not None:
            headers.append(f"Last-Event-ID: {self.last_id}")
        start = decode(self.last_id or self.cursor)
        self.resume_from({stream: position.seq for stream, position in start.items()})
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname, parsed.port), 5
        )
        try:
            request = [f"GET {parsed.path}?{urllib.parse.urlencode(query)} HTTP/1.1"]
            request += [f"Host: {parsed.netloc}", *headers, "", ""]
            writer.write("\r\n".join(request).encode())
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
            assert head.split()[1] == "200", (self.name, head)
            chunked = "transfer-encoding: chunked" in head.lower()
            sse = SSEReader(SimpleNamespace(streaming_content=ChunkedBody(reader, chunked)))
            while not self.done(target):
                assert time.monotonic() < deadline, f"{self.name}: stuck at {self.contiguous}"
                try:
                    message = await sse.message(timeout=0.5)
                except TimeoutError:
                    message = {}
                assert message.get("event") not in ("reset", "unsubscribed"), (self.name, message)
                if "seq" in message.get("data", {}):
                    self.record(message["data"])
                if "id" in message:
                    self.last_id = message["id"]
                if self.stuck(target):
                    self.resumes += 1
                    for stream in self.streams:
                        self.moved_at[stream] = time.monotonic()
                    return  # reconnect to the same node with Last-Event-ID
        finally:
            writer.close()
            with contextlib.suppress(*LOST):
                await writer.wait_closed()


class Poller(Reader):
    """Long-polls /api/realtime/events/ with the cursor of its last answer."""

    transport = "poll"

    def __init__(self, *args: Any, cursor: str) -> None:
        super().__init__(*args)
        self.cursor = cursor

    async def follow(self, target: dict[str, int], deadline: float) -> None:
        while not self.done(target):
            assert time.monotonic() < deadline, f"{self.name}: stuck at {self.contiguous}"
            query = {"streams": ",".join(self.streams), "cursor": self.cursor}
            query |= {"wait": str(POLL_WAIT), "limit": "200"}
            url = f"{self.url}?{urllib.parse.urlencode(query)}"
            body = await asyncio.to_thread(self._get, url)
            assert body["resets"] == [], (self.name, body["resets"])
            for frame in body["events"]:
                self.record(frame)
            self.cursor = body["cursor"]

    def _get(self, url: str) -> dict[str, Any]:
        request = urllib.request.Request(url, headers={"Cookie": f"sessionid={self.session}"})
        try:
            with urllib.request.urlopen(request, timeout=POLL_WAIT + 10) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:  # an answer, not a lost node
            raise AssertionError(f"{self.name}: {exc.code} {exc.read()!r}") from None


def change(rng: random.Random, projects: list[Any], done: Counter[str]) -> None:
    """One change to the items of the two projects, picked at random (some in one commit)."""
    home = projects[0]
    items = list(Item.objects.filter(project__in=projects).order_by("pk"))
    roll = rng.random()
    if len(items) < 6 or roll < 0.2:
        project = home if rng.random() < 0.7 else projects[1]
        Item.objects.create(project=project, title=f"item {rng.randrange(10**6)}")
        done["create"] += 1
        return
    item = rng.choice(items)
    if roll < 0.4:
        item.title = f"title {rng.randrange(10**6)}"
        item.save()
        done["title"] += 1
    elif roll < 0.55:
        item.done = not item.done
        item.save(update_fields=["done"])
        done["done"] += 1
    elif roll < 0.7:
        item.position = rng.randrange(100)
        item.save(update_fields=["position"])
        done["position"] += 1
    elif roll < 0.8:
        item.delete()
        done["delete"] += 1
    elif roll < 0.92:
        item.project = projects[1] if item.project_id == home.pk else home
        item.save()
        done["move"] += 1
    elif roll < 0.97:
        with transaction.atomic():  # several changes, one commit
            for other in rng.sample(items, 3):
                other.title = f"batch {rng.randrange(10**6)}"
                other.position = rng.randrange(100)
                other.save()
        done["batch"] += 1
    else:
        with contextlib.suppress(Rollback), transaction.atomic():
            item.title = "never committed"
            item.save()
            Item.objects.create(project=home, title="never committed")
            raise Rollback
        done["rollback"] += 1


def serialized(project: Any) -> dict[int, dict[str, Any]]:
    """The project's items as its events carry them."""
    return {
        item.pk: json.loads(json.dumps(ItemSerializer(item).data))
        for item in Item.objects.filter(project=project)
    }


def test_websocket_sse_and_feed_end_in_the_same_state_through_redis_restart_and_node_kill(
    private_redis, settings, tmp_path
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    settings.REALTIME = {"PUBLISH_TIMEOUT": 1.0, "RETENTION_MAX_EVENTS": None}
    people = team(6)
    other = ProjectFactory(owner=people.owner, organization=people.project.organization)
    for reader in people.readers:
        add_member(other, reader)
    flush()
    projects = [people.project, other]
    streams = [f"project:{project.pk}" for project in projects]
    rows = {row.name: row for row in Stream.objects.filter(name__in=streams)}
    bases = {s: rows[s].last_seq for s in streams}
    cursor = encode({s: Position(rows[s].last_seq, rows[s].epoch) for s in streams})
    env = {"DATABASE_URL": database_url(), "REDIS_URL": private_redis.url, "DEBUG": "1"}
    done: Counter[str] = Counter()
    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        a, b = node_a.port, node_b.port
        sessions = iter(people.sessions)
        readers: list[Reader] = []
        for name, first, second in (("A", a, b), ("B", b, a)):
            ws = [f"ws://127.0.0.1:{port}/ws/realtime/" for port in (first, second)]
            sse = [f"http://127.0.0.1:{port}/realtime/sse/" for port in (first, second)]
            feed = [f"http://127.0.0.1:{port}/api/realtime/events/" for port in (first, second)]
            readers += [
                WebSocketReader(name, ws, next(sessions), bases),
                SSEClient(name, sse, next(sessions), bases, cursor=cursor),
                Poller(name, feed, next(sessions), bases, cursor=cursor),
            ]
        wrote, stop = threading.Event(), threading.Event()
        failures: list[BaseException] = []
        unpublished: list[int] = []

        restart = threading.Timer(DOWN_FOR, private_redis.start)

        def writer() -> None:
            try:
                time.sleep(1.0)  # the readers connect first
                rng = random.Random(8)
                for n in range(CHANGES):
                    if stop.is_set():
                        return  # a reader failed: the test is over
                    if n == REDIS_AT:
                        private_redis.stop()
                        restart.start()
                    if n == KILL_AT:
                        restart.join()
                        node_a.process.kill()  # SIGKILL: no close frames, no response ends
                    change(rng, projects, done)
                    time.sleep(0.02)
                flush(timeout=30)
                unpublished.append(Event.objects.filter(published_at__isnull=True).count())
                relay_backlog(timeout=30)
            except BaseException as exc:
                failures.append(exc)
            finally:
                if restart.is_alive():
                    restart.join()
                connection.close()
                wrote.set()

        def last_seqs() -> dict[str, int]:
            try:
                rows = Stream.objects.filter(name__in=streams).values_list("name", "last_seq")
                return dict(rows)
            finally:
                connection.close()

        async def scenario() -> None:
            thread = threading.Thread(target=writer)
            thread.start()
            target: dict[str, int] = {}
            deadline = time.monotonic() + 75
            tasks = [asyncio.create_task(reader.run(target, deadline)) for reader in readers]
            try:
                while not wrote.is_set():  # a reader that fails ends the test at once
                    done_now = [t for t in tasks if t.done()]
                    for task in done_now:
                        task.result()
                    await asyncio.sleep(0.2)
                assert not failures, failures[0]
                target.update(await asyncio.to_thread(last_seqs))
                await asyncio.gather(*tasks)
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.to_thread(thread.join, 30)

        asyncio.run(scenario())

    expected = [
        (s, seq, str(event_id))
        for s in streams
        for seq, event_id in Event.objects.filter(stream__name=s, seq__gt=bases[s])
        .order_by("seq")
        .values_list("seq", "event_id")
    ]
    database = {s: serialized(project) for s, project in zip(streams, projects, strict=True)}
    report = {
        r.name: (r.reconnects, r.resumes, r.duplicates) for r in readers
    }  # (lost connections, resumes from the log, duplicates dropped)
    print("changes:", dict(done), "unpublished:", unpublished, "readers:", report)  # with -s
    assert all(done[kind] for kind in ("create", "title", "done", "position", "delete", "move"))
    assert all(database.values())  # a state worth comparing: items in both projects
    for reader in readers:
        assert reader.log() == expected, reader.name  # the log's events, each once, no gap
        assert reader.state() == database, reader.name  # folded, they are the database
        if reader.name.endswith("@A"):
            assert reader.reconnects >= 1, reader.name  # it lost node A and went on through B
        # Each resume started where the reader said it was (`since`, Last-Event-ID, cursor):
        # the only duplicates are events it held beyond that position (none for the feed).
        assert reader.duplicates <= reader.resent, reader.name
    assert unpublished[0] > 0  # Redis was down: some commits were left for the relay
