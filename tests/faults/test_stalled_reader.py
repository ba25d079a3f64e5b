"""Fault 4: a client stops reading while 10,000 events are published.

The server must not buffer without bound: the socket is closed with 4409 once the client has
left `MAX_UNACKED_BYTES` unacknowledged, the daphne process' memory grows by a bounded amount,
and a resume with `since` gives the client every event it missed, in order. A private
redis-server carries the events, so the flood touches no shared service.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import websockets

import realtime
from realtime.models import Event
from realtime.testing import flush

from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect, team

TOTAL = 10_000
CREDIT = 256 * 1024

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_a_stalled_reader_is_closed_memory_stays_bounded_and_a_resume_fills_the_gap(
    private_redis, settings, tmp_path
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    people = team(1)
    stream, session = people.stream, people.sessions[0]
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": private_redis.url,
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "TEST_REALTIME": json.dumps({"MAX_UNACKED_BYTES": CREDIT}),
    }
    with Daphne(env, tmp_path / "daphne.log") as node:
        url = f"ws://127.0.0.1:{node.port}/ws/realtime/"

        async def scenario() -> tuple[list[int], int, int, int | None]:
            async with connect(url, session, max_queue=4) as socket:

                async def frame() -> dict:
                    return json.loads(await asyncio.wait_for(socket.recv(), 20))

                while (await frame()).get("op") != "welcome":
                    pass
                await socket.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
                while (reply := await frame()).get("op") != "reply":
                    pass
                start = reply["data"]["seq"]
                before = rss_kib(node.process.pid)

                def write() -> None:
                    try:
                        for n in range(TOTAL):
                            realtime.emit(stream, "v1:fault.tick", {"n": n, "pad": "x" * 64})
                        flush(timeout=60)
                    finally:
                        from django.db import connection

                        connection.close()

                # The client reads nothing while everything is published.
                await asyncio.to_thread(write)
                await asyncio.sleep(1.0)
                peak = rss_kib(node.process.pid)
                seen: list[int] = []

                async def drain() -> None:
                    while True:
                        got = await frame()
                        if got.get("op") == "event" and "seq" in got:
                            seen.append(got["seq"])

                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await drain()
                # A reader this far behind may not see the close frame before the server drops
                # the TCP connection (it stopped reading); the server logs why it closed.
                code = closed.value.rcvd.code if closed.value.rcvd else None
                return seen, start, peak - before, code

        seen, start, growth, code = asyncio.run(scenario())
        assert code in (4409, None)
        assert "slow consumer" in node.output()  # closed as a slow consumer (4409)
        assert 0 < len(seen) < TOTAL  # it got some before the server gave up on it
        assert seen == list(range(start + 1, start + 1 + len(seen)))
        # Bounded: far less than the 10,000 frames (about 1.7 MB of them) times the overheads
        # an unbounded queue would hold. The credit is 256 KiB.
        assert growth < 48 * 1024, f"daphne grew by {growth} KiB"

        async def resume() -> list[int]:
            async with connect(url, session) as socket:
                got: list[int] = []
                while json.loads(await socket.recv()).get("op") != "welcome":
                    pass
                since = seen[-1]
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "r", "stream": stream, "since": since})
                )
                deadline = time.monotonic() + 60
                while len(got) < start + TOTAL - since:
                    assert time.monotonic() < deadline, f"resume stuck at {len(got)}"
                    frame = json.loads(await asyncio.wait_for(socket.recv(), 20))
                    if frame.get("op") == "ping":
                        await socket.send('{"op":"pong"}')
                    elif frame.get("op") == "reply":
                        assert frame["data"]["recovered"] is True
                    elif frame.get("op") == "event" and "seq" in frame:
                        got.append(frame["seq"])
                return got

        rest = asyncio.run(resume())
    assert seen + rest == list(range(start + 1, start + TOTAL + 1))
    assert Event.objects.filter(stream__name=stream, type="v1:fault.tick").count() == TOTAL
    assert threading.active_count() < 50
