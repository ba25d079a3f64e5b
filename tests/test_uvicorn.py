"""SSE served by uvicorn, not only daphne: live events, and the connection freed on disconnect."""

from __future__ import annotations

import http.client
import os
import sys
import time

import pytest

from realtime.models import Connection
from realtime.testing import session_for

from .factories import ItemFactory, ProjectFactory, UserFactory
from .live import Daphne, database_url
from .test_sse_live import read_event


class Uvicorn(Daphne):
    """A uvicorn process serving config.asgi on a free loopback port."""

    name = "uvicorn"

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
        ]


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
