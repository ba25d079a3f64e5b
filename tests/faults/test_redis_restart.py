"""Fault 1: Redis is killed after event 3,000 of 10,000 and restarted 2 s later.

Two daphne nodes share a private redis-server (never the machine's); four websocket clients,
two per node, follow one stream while this process writes 10,000 events through the real
pipeline. Redis dies mid-stream and comes back; the relay publishes what could not be
published. Every client must end with all 10,000 events, in order, each once. The clients
act as the JS client does: a seq that jumps, or silence while behind, makes them resume from
the log (`subscribe` with `since`); pub/sub alone is shown to have lost events (they needed
the log).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

import realtime
from realtime.models import Event, Stream
from realtime.testing import flush

from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect, relay_backlog, team

TOTAL = 10_000
KILL_AT = 3_000
DOWN_FOR = 2.0

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


class Follower:
    """A websocket client keeping one stream complete and in order, resuming from the log."""

    def __init__(self, url: str, session: str, stream: str) -> None:
        self.url, self.session, self.stream = url, session, stream
        self.seqs: list[int] = []
        self.event_ids: set[str] = set()
        self.last = 0
        self.resumes = 0
        self.target: int | None = None
        self.refs = 0
        self.base = 0

    async def run(self, deadline: float) -> None:
        async with connect(
            self.url,
            self.session,
            max_queue=None,
        ) as socket:
            self.socket = socket
            await self._until_op("welcome")
            # From the position before the writer started: a late subscriber replays the rest.
            await self._subscribe(self.base)
            self.last = self.start = self.base
            resyncing = False
            while self.target is None or self.last < self.target:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.url}: stuck at {self.last} of {self.target}")
                try:
                    frame = json.loads(await asyncio.wait_for(socket.recv(), 1.5))
                except TimeoutError:
                    frame = None
                if frame is not None and frame.get("op") == "event" and "seq" not in frame:
                    continue  # presence and typing: not logged
                if frame is None or (frame.get("op") == "event" and frame["seq"] > self.last + 1):
                    if frame is None and (self.target is None or self.last >= self.target):
                        continue
                    if not resyncing:  # a gap, or silence while behind: resume from the log
                        resyncing = True
                        await self._resubscribe()
                        resyncing = False
                    continue
                if frame.get("op") == "ping":
                    await socket.send(json.dumps({"op": "pong"}))
                elif frame.get("op") == "event" and frame["seq"] == self.last + 1:
                    self.last = frame["seq"]
                    self.seqs.append(frame["seq"])
                    self.event_ids.add(frame["eventId"])

    async def _until_op(self, op: str, ref: str | None = None) -> dict:
        while True:
            frame = json.loads(await asyncio.wait_for(self.socket.recv(), 10))
            if frame.get("op") == "ping":
                await self.socket.send(json.dumps({"op": "pong"}))
            elif frame.get("op") == op and (ref is None or frame.get("ref") == ref):
                return frame

    async def _subscribe(self, since: int | None) -> dict:
        self.refs += 1
        ref = f"s{self.refs}"
        frame: dict[str, object] = {"op": "subscribe", "ref": ref, "stream": self.stream}
        if since is not None:
            frame["since"] = since
        await self.socket.send(json.dumps(frame))
        reply = await self._until_op("reply", ref)
        assert reply["ok"] is True, reply
        return reply

    async def _resubscribe(self) -> None:
        self.resumes += 1
        self.refs += 1
        ref = f"u{self.refs}"
        await self.socket.send(json.dumps({"op": "unsubscribe", "ref": ref, "stream": self.stream}))
        await self._until_op("reply", ref)
        reply = await self._subscribe(self.last)
        assert reply["data"]["recovered"] is True, reply


def test_redis_killed_mid_stream_every_client_ends_with_every_event(
    private_redis, settings, tmp_path
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    settings.REALTIME = {"PUBLISH_TIMEOUT": 1.0, "RETENTION_MAX_EVENTS": None}
    people = team(4)
    stream, base = people.stream, people.base
    env = {"DATABASE_URL": database_url(), "REDIS_URL": private_redis.url, "DEBUG": "1"}
    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        nodes = [node_a, node_b, node_a, node_b]
        followers = [
            Follower(f"ws://127.0.0.1:{node.port}/ws/realtime/", session, stream)
            for node, session in zip(nodes, people.sessions, strict=True)
        ]
        for follower in followers:
            follower.base = base
        wrote = threading.Event()
        failures: list[BaseException] = []

        def writer() -> None:
            try:
                time.sleep(1.0)  # the followers subscribe first
                for n in range(TOTAL):
                    if n == KILL_AT:
                        private_redis.stop()
                        threading.Timer(DOWN_FOR, private_redis.start).start()
                    realtime.emit(stream, "v1:fault.tick", {"n": n})
                flush(timeout=30)
                relay_backlog(timeout=60)
            except BaseException as exc:
                failures.append(exc)
            finally:
                from django.db import connection

                connection.close()
                wrote.set()

        async def scenario() -> None:
            thread = threading.Thread(target=writer)
            thread.start()
            deadline = time.monotonic() + 180
            tasks = [asyncio.create_task(f.run(deadline)) for f in followers]
            await asyncio.to_thread(wrote.wait, 180)
            assert not failures, failures[0]
            target = await asyncio.to_thread(lambda: Stream.objects.get(name=stream).last_seq)
            for follower in followers:
                follower.target = target
            await asyncio.gather(*tasks)
            thread.join(10)

        asyncio.run(scenario())

    logged = list(Event.objects.filter(stream__name=stream, type="v1:fault.tick").order_by("seq"))
    assert len(logged) == TOTAL
    expected = [event.seq for event in logged]
    ids = {str(event.event_id) for event in logged}
    for follower in followers:
        mine = [s for s in follower.seqs if s > follower.start]
        assert mine == expected, f"{follower.url}: {len(mine)} events"  # all, in order, once
        assert ids <= follower.event_ids
    # Pub/sub alone lost events: the clients had to resume from the log to complete.
    print("resumes per client:", [f.resumes for f in followers])  # shown with -s
    assert sum(f.resumes for f in followers) > 0
