"""uvicorn, not only daphne: SSE (live events, the connection freed on disconnect) and the
WebSocket under uvicorn's sans-I/O implementation (live events in order, resume)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
import time

import pytest
from asgiref.sync import async_to_sync

from realtime.models import Connection
from realtime.testing import session_for

from .factories import ItemFactory, ProjectFactory, UserFactory
from .live import Daphne, database_url
from .test_sse_live import read_event
from .test_ws_live import connect, frames_until, start


class Uvicorn(Daphne):
    """A uvicorn process serving config.asgi on a free loopback port."""

    name = "uvicorn"
    ws = "auto"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--ws",
            self.ws,
        ]


class UvicornSansIO(Uvicorn):
    """uvicorn with its sans-I/O `websockets` implementation (docs/scaling.md)."""

    ws = "websockets-sansio"


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sse_from_uvicorn_delivers_live_events_and_frees_the_connection(tmp_path):
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    cookie = f"sessionid={session_for(owner)}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}
    with Uvicorn(env, tmp_path / "uvicorn.log") as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(
            "GET", f"/realtime/sse/?streams=project:{project.pk}", headers={"Cookie": cookie}
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        assert response.getheader("Cache-Control") == "no-store"
        # Saved in this process, published through Redis; the stream starts at the position read
        # when the request came, so the event is not missed however soon it is saved.
        ItemFactory(project=project, title="from the test process")
        event = read_event(response, time.monotonic() + 10)
        assert event["event"] == "v1:item.created"
        assert event["data"]["stream"] == f"project:{project.pk}"
        assert event["data"]["data"]["title"] == "from the test process"
        assert event["id"]  # a Last-Event-ID to resume from
        assert Connection.objects.filter(transport="sse").count() == 1

        conn.close()  # the client goes away: uvicorn's http.disconnect must end the stream
        deadline = time.monotonic() + 5
        while Connection.objects.filter(transport="sse").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Connection.objects.filter(transport="sse").exists(), server.output()
        assert "Traceback" not in server.output()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_websocket_from_uvicorn_sans_io_delivers_in_order_and_resumes(tmp_path):
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    session = session_for(owner)
    stream = f"project:{project.pk}"
    with start(tmp_path, {}, UvicornSansIO) as server:

        async def live() -> tuple[str, int, list[int]]:
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                await socket.send(json.dumps({"op": "subscribe", "ref": "1", "stream": stream}))
                reply = (await frames_until(socket, "reply"))[-1]
                assert reply["ok"], reply
                for n in range(20):
                    await asyncio.to_thread(ItemFactory, project=project, title=f"live {n}")
                seqs: list[int] = []
                while len(seqs) < 20:
                    seqs.append((await frames_until(socket, "event"))[-1]["seq"])
                return reply["data"]["epoch"], reply["data"]["seq"], seqs

        epoch, position, seqs = async_to_sync(live)()
        assert seqs == list(range(position + 1, position + 21))  # after the project's own event
        for n in range(5):
            ItemFactory(project=project, title=f"missed {n}")

        async def resumed() -> list[str]:
            async with connect(server, session) as socket:
                await frames_until(socket, "welcome")
                subscribe = {"op": "subscribe", "ref": "2", "stream": stream}
                since = position + 20
                await socket.send(json.dumps({**subscribe, "since": since, "epoch": epoch}))
                reply = (await frames_until(socket, "reply"))[-1]
                assert reply["data"]["recovered"] is True, reply
                events = [(await frames_until(socket, "event"))[-1] for _ in range(5)]
                assert [e["seq"] for e in events] == list(range(since + 1, since + 6))
                return [e["data"]["title"] for e in events]

        assert async_to_sync(resumed)() == [f"missed {n}" for n in range(5)]
        assert "Traceback" not in server.output()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_ticket_never_appears_in_uvicorns_log(tmp_path):
    import websockets
    from websockets.typing import Origin

    from realtime.tickets import issue

    ticket = issue(UserFactory())
    env = {"DATABASE_URL": database_url(), "DEBUG": "1"}
    with UvicornSansIO(env, tmp_path / "uvicorn.log") as server:

        async def visit() -> None:
            async with websockets.connect(
                f"ws://127.0.0.1:{server.port}/ws/realtime/?ticket={ticket}",
                origin=Origin("http://127.0.0.1"),
            ) as socket:
                assert json.loads(await socket.recv())["op"] == "welcome"

        asyncio.run(visit())
        log = server.output()
    assert "/ws/realtime/?ticket=[redacted]" in log  # the line is there, without the ticket
    assert ticket.rsplit(":", 1)[-1] not in log
