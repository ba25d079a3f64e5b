"""Fault 7: abuse from some sockets while others work.

Against one daphne node (on a private redis-server): a socket publishing as fast as it can
(about 1,000 frames/s), one sending malformed frames, one deep JSON, one an oversize frame,
and 50 TCP connections that
start a WebSocket handshake and stall. Each abusive socket is closed with its documented code
(4429, 4400, 4400, 4413); meanwhile a well-behaved client on the same node gets every event
of its stream in order and its pings answered.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import websockets

from board.models import Item
from realtime.testing import flush, session_for

from ..factories import ProjectFactory, UserFactory
from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]
EVENTS = 50


def test_abusive_sockets_are_closed_and_a_good_client_is_unaffected(
    private_redis, settings, tmp_path
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    stream = f"project:{project.pk}"
    sessions = [session_for(UserFactory()) for _ in range(4)]
    good_session = session_for(owner)
    env = {"DATABASE_URL": database_url(), "DEBUG": "1", "REDIS_URL": private_redis.url}
    with Daphne(env, tmp_path / "daphne.log") as node:
        url = f"ws://127.0.0.1:{node.port}/ws/realtime/"

        async def closed_code(ws) -> int | None:
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

        async def flooder(session: str) -> int | None:
            async with connect(url, session) as ws:
                frame = json.dumps(
                    {"op": "publish", "stream": stream, "type": "v1:typing.started", "data": {}}
                )
                reader = asyncio.create_task(closed_code(ws))
                started = time.monotonic()
                try:
                    while time.monotonic() - started < 20:
                        await ws.send(frame)
                        await asyncio.sleep(0.001)  # about 1,000 frames a second
                except websockets.ConnectionClosed:
                    pass
                return await asyncio.wait_for(reader, 30)

        async def sender(session: str, payload: str, repeat: int) -> int | None:
            async with connect(url, session) as ws:
                reader = asyncio.create_task(closed_code(ws))
                try:
                    for _ in range(repeat):
                        await ws.send(payload)
                        await asyncio.sleep(0.01)
                except websockets.ConnectionClosed:
                    pass
                return await asyncio.wait_for(reader, 30)

        def stall() -> list[socket.socket]:
            stalled = []
            for _ in range(50):
                s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
                s.sendall(
                    b"GET /ws/realtime/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                )
                stalled.append(s)
            return stalled

        async def good_client() -> tuple[list[int], int]:
            async with connect(url, good_session) as ws:
                while json.loads(await ws.recv()).get("op") != "welcome":
                    pass
                await ws.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
                seqs: list[int] = []
                pongs = 0
                start = None

                def write() -> None:
                    from django.db import connection

                    for n in range(EVENTS):
                        Item.objects.create(project=project, title=f"item {n}", position=n)
                        time.sleep(0.05)
                    flush(timeout=30)
                    connection.close()

                # Written once the subscription's position is known, so every item is after it.
                writing: asyncio.Task[None] | None = None
                deadline = time.monotonic() + 60
                while len(seqs) < EVENTS:
                    assert time.monotonic() < deadline, f"only {len(seqs)} events"
                    if len(seqs) % 10 == 0 and pongs * 10 <= len(seqs):
                        await ws.send(json.dumps({"op": "ping", "ref": f"p{len(seqs)}"}))
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if frame.get("op") == "reply" and frame.get("ref") == "s":
                        start = frame["data"]["seq"]
                        writing = asyncio.create_task(asyncio.to_thread(write))
                    elif frame.get("op") == "pong":
                        pongs += 1
                    elif frame.get("op") == "ping":
                        await ws.send('{"op":"pong"}')
                    elif frame.get("op") == "event" and "seq" in frame:
                        seqs.append(frame["seq"])
                assert writing is not None
                await writing
                assert start is not None
                return [s - start for s in seqs], pongs

        async def scenario():
            stalled = await asyncio.to_thread(stall)
            try:
                return await asyncio.gather(
                    flooder(sessions[0]),
                    sender(sessions[1], "{not json", 20),
                    sender(sessions[2], "[" * 10_000 + "]" * 10_000, 20),
                    sender(sessions[3], "x" * (70 * 1024), 1),
                    good_client(),
                )
            finally:
                for s in stalled:
                    s.close()

        flood, malformed, deep, oversize, (seqs, pongs) = asyncio.run(scenario())
    assert flood == 4429
    assert malformed == 4400
    assert deep in (4400, 4413)  # 20 KB of brackets: too deep (and within the size limit)
    assert oversize == 4413
    assert seqs == list(range(1, EVENTS + 1))  # every event, in order, once
    assert pongs >= EVENTS // 10
