"""Against a real daphne with the websockets client: resume, heartbeat and slow consumers."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import websockets
from asgiref.sync import async_to_sync
from websockets.typing import Origin

from realtime.testing import session_for

from .factories import ItemFactory, ProjectFactory, UserFactory
from .live import Daphne, database_url

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def start(tmp_path, realtime: dict, server: type[Daphne] = Daphne) -> Daphne:
    """A server process (daphne, or a subclass's) with these REALTIME settings."""
    env = {
        "DATABASE_URL": database_url(),
        "REDIS_URL": os.environ["REDIS_URL"],
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "TEST_REALTIME": json.dumps(realtime),
    }
    return server(env, tmp_path / f"{server.name}.log")


def connect(server: Daphne, session: str):
    return websockets.connect(
        f"ws://127.0.0.1:{server.port}/ws/realtime/",
        origin=Origin("http://127.0.0.1"),
        additional_headers={"Cookie": f"sessionid={session}"},
    )


async def frames_until(socket, op: str, *, pong: bool = True, timeout: float = 10) -> list:  # noqa: ASYNC109
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await socket.recv())
            if frame.get("op") == "ping" and pong:
                await socket.send('{"op":"pong"}')
            seen.append(frame)
            if frame.get("op") == op:
                return seen


def test_resume_after_a_reconnect_replays_exactly_what_was_missed(tmp_path):
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    session = session_for(owner)
    stream = f"project:{project.pk}"
    with start(tmp_path, {}) as server:

        async def first_visit():
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                await socket.send(json.dumps({"op": "subscribe", "ref": "1", "stream": stream}))
                reply = (await frames_until(socket, "reply"))[-1]
                await asyncio.to_thread(ItemFactory, project=project, title="seen")
                event = (await frames_until(socket, "event"))[-1]
                return reply["data"]["epoch"], event["seq"]

        epoch, last_seq = async_to_sync(first_visit)()
        missed = [ItemFactory(project=project, title=f"missed {n}") for n in range(3)]

        async def second_visit():
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                await socket.send(
                    json.dumps(
                        {
                            "op": "subscribe",
                            "ref": "2",
                            "stream": stream,
                            "since": last_seq,
                            "epoch": epoch,
                        }
                    )
                )
                reply = (await frames_until(socket, "reply"))[-1]
                events = [(await frames_until(socket, "event"))[-1] for _ in range(3)]
                return reply, events

        reply, events = async_to_sync(second_visit)()
    assert reply["data"]["recovered"] is True
    assert [e["seq"] for e in events] == [last_seq + 1, last_seq + 2, last_seq + 3]
    assert [e["data"]["title"] for e in events] == [m.title for m in missed]


def test_a_client_that_stops_answering_is_closed_with_4408(tmp_path):
    owner = UserFactory()
    session = session_for(owner)
    with start(tmp_path, {"HEARTBEAT": 0.5, "CONNECTION_SWEEP_AFTER": 5}) as server:

        async def silent():
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await frames_until(socket, "never", pong=False, timeout=6)
                return closed.value.rcvd.code

        assert async_to_sync(silent)() == 4408


def test_a_client_that_does_not_acknowledge_is_closed_as_slow_consumer(tmp_path):
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    session = session_for(owner)
    with start(tmp_path, {"MAX_UNACKED_BYTES": 4000}) as server:

        async def lagging():
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "1", "stream": f"project:{project.pk}"})
                )
                await frames_until(socket, "reply")

                def flood():
                    for n in range(60):
                        ItemFactory(project=project, title="x" * 80 + str(n))

                await asyncio.to_thread(flood)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await frames_until(socket, "never", pong=False, timeout=15)
                return closed.value.rcvd.code

        assert async_to_sync(lagging)() == 4409
