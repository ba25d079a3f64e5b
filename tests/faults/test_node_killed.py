"""Fault 2: a daphne node is killed (SIGKILL) mid-stream.

Ten clients follow a stream through node A while this process writes 2,000 events; A is
killed after about 500 of them. Each client reconnects to node B and resumes with `since`:
every client ends with all 2,000 events, in order, each once. Node A's `Connection` rows are
swept; its presence entries expire (a leave, if any, is announced once, seen from B).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import websockets

import realtime
from realtime.models import Connection, Event, Stream
from realtime.testing import flush

from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect, team

TOTAL = 2_000
KILL_AFTER = 500
CLIENTS = 10

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


async def follow(urls: list[str], session: str, stream: str, base: int, target: dict) -> dict:
    """Follow `stream` from `base`; on a lost connection, resume on the next node."""
    seqs: list[int] = []
    last = base
    reconnects = 0
    node = 0
    deadline = time.monotonic() + 120
    while "seq" not in target or last < target["seq"]:
        assert time.monotonic() < deadline, f"stuck at {last}"
        try:
            async with connect(
                urls[node],
                session,
                open_timeout=5,
            ) as socket:
                while json.loads(await socket.recv()).get("op") != "welcome":
                    pass
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "s", "stream": stream, "since": last})
                )
                while "seq" not in target or last < target["seq"]:
                    try:
                        frame = json.loads(await asyncio.wait_for(socket.recv(), 2))
                    except TimeoutError:
                        continue
                    if frame.get("op") == "ping":
                        await socket.send('{"op":"pong"}')
                    elif frame.get("op") == "reply":
                        assert frame["ok"], frame
                        assert frame["data"]["recovered"], frame
                    elif frame.get("op") == "event" and "seq" in frame:
                        assert frame["seq"] == last + 1, (frame["seq"], last)  # no gap
                        last = frame["seq"]
                        seqs.append(last)
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake):
            reconnects += 1
            node = (node + 1) % len(urls)
            await asyncio.sleep(0.2)
    return {"seqs": seqs, "reconnects": reconnects}


def test_clients_of_a_killed_node_resume_on_the_other_with_no_gap(
    private_redis, settings, tmp_path
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    people = team(CLIENTS)
    readers, stream, base, sessions = people.readers, people.stream, people.base, people.sessions
    owner_session = people.owner_session
    presence = {
        "CONFIG": {"url": private_redis.url, "prefix": f"test-{uuid.uuid4().hex}"},
        "TTL": 3.0,
        "REFRESH_INTERVAL": 1.0,
        "SWEEP_INTERVAL": 1.0,
    }
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "DATABASE_URL": database_url(),
        "REDIS_URL": private_redis.url,
        "DEBUG": "1",
        "TEST_REALTIME": json.dumps({"HEARTBEAT": 1.0, "CONNECTION_SWEEP_AFTER": 3.0}),
        "TEST_PRESENCE": json.dumps(presence),
    }
    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        a_url = f"ws://127.0.0.1:{node_a.port}/ws/realtime/"
        b_url = f"ws://127.0.0.1:{node_b.port}/ws/realtime/"
        target: dict = {}
        written = threading.Event()

        def writer() -> None:
            try:
                time.sleep(1.0)
                for n in range(TOTAL):
                    if n == KILL_AFTER:
                        node_a.process.kill()  # SIGKILL: no close frames, no leaves
                    realtime.emit(stream, "v1:fault.tick", {"n": n})
                    time.sleep(0.002)
                flush(timeout=30)
            finally:
                from django.db import connection

                connection.close()
                written.set()

        async def watch_leaves() -> list[int]:
            """An observer on node B: the presence leaves it is told of."""
            left: list[int] = []
            async with connect(
                b_url,
                owner_session,
            ) as socket:
                while json.loads(await socket.recv()).get("op") != "welcome":
                    pass
                await socket.send(json.dumps({"op": "subscribe", "ref": "o", "stream": stream}))
                end = time.monotonic() + 25
                while time.monotonic() < end:
                    try:
                        frame = json.loads(await asyncio.wait_for(socket.recv(), 1))
                    except TimeoutError:
                        continue
                    if frame.get("op") == "ping":
                        await socket.send('{"op":"pong"}')
                    elif frame.get("type") == "v1:presence.left":
                        left.append(frame["data"]["user"]["id"])
            return left

        async def scenario():
            thread = threading.Thread(target=writer)
            thread.start()
            followers = [
                asyncio.create_task(follow([a_url, b_url], session, stream, base, target))
                for session in sessions
            ]
            watcher = asyncio.create_task(watch_leaves())
            await asyncio.to_thread(written.wait, 120)
            target["seq"] = await asyncio.to_thread(
                lambda: Stream.objects.get(name=stream).last_seq
            )
            results = await asyncio.gather(*followers)
            thread.join(10)
            return results, await watcher

        results, left = asyncio.run(scenario())
        # Node ids are "<host>:<pid>": node A's rows are swept, node B's are still there
        # (the observer's socket closed, but not every row need be gone yet).
        dead = Connection.objects.filter(node__endswith=f":{node_a.process.pid}")
        deadline = time.monotonic() + 10
        while dead.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        a_rows_left = dead.count()

    expected = list(
        Event.objects.filter(stream__name=stream, seq__gt=base)
        .order_by("seq")
        .values_list("seq", flat=True)
    )
    assert len(expected) == TOTAL
    for result in results:
        assert result["seqs"] == expected  # all, in order, once
        assert result["reconnects"] >= 1  # each one lost node A and came back through B
    assert a_rows_left == 0  # node A's Connection rows are swept
    # The readers reconnected to B within the presence TTL, so they stayed present; whatever
    # leave the sweep of A's entries announced was announced once, and only for them.
    assert len(left) == len(set(left))
    assert set(left) <= {reader.pk for reader in readers}
