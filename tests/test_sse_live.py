"""SSE read by a real HTTP client from daphne: live, resume with Last-Event-ID, disconnect."""

from __future__ import annotations

import http.client
import json
import os
import time

import pytest

from realtime.models import Connection
from realtime.testing import session_for

from .factories import ItemFactory, ProjectFactory, UserFactory
from .live import Daphne, database_url


def read_event(response, deadline: float) -> dict:
    fields: dict = {}
    while time.monotonic() < deadline:
        line = response.fp.readline().decode().rstrip("\n")
        if line == "":
            if "data" in fields:
                return fields
            fields = {}
            continue
        if not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
    raise TimeoutError


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sse_from_daphne_resumes_and_frees_the_connection(tmp_path):
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    cookie = f"sessionid={session_for(owner)}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}
    path = f"/realtime/sse/?streams=project:{project.pk}"
    with Daphne(env, tmp_path / "sse.log") as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        for title in ("one", "two"):
            ItemFactory(project=project, title=title)
        first = [read_event(response, time.monotonic() + 10) for _ in range(2)]
        assert [e["data"]["data"]["title"] for e in first] == ["one", "two"]
        assert Connection.objects.filter(transport="sse").count() == 1
        conn.close()  # the client goes away: the server must let go at once

        deadline = time.monotonic() + 5
        while Connection.objects.filter(transport="sse").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Connection.objects.filter(transport="sse").exists()

        ItemFactory(project=project, title="missed")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", path, headers={"Cookie": cookie, "Last-Event-ID": first[-1]["id"]})
        response = conn.getresponse()
        resumed = read_event(response, time.monotonic() + 10)
        assert resumed["data"]["data"]["title"] == "missed"
        assert resumed["data"]["seq"] == first[-1]["data"]["seq"] + 1
        conn.close()
        assert "Traceback" not in server.output()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_open_sse_streams_hold_no_database_connections(tmp_path):
    from django.db import connection

    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    cookie = f"sessionid={session_for(owner)}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}

    def sessions() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            return int(cursor.fetchone()[0])

    with Daphne(env, tmp_path / "sse.log") as server:
        before = sessions()
        clients = []
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request(
                "GET", f"/realtime/sse/?streams=project:{project.pk}", headers={"Cookie": cookie}
            )
            response = conn.getresponse()
            assert response.status == 200
            assert response.read(len(b"retry: 3000\n\n")) == b"retry: 3000\n\n"
            clients.append(conn)
        time.sleep(0.5)
        held = sessions() - before
        ItemFactory(project=project, title="to all")
        for conn in clients:
            conn.close()
    # A few worker threads may keep one each; one per stream would be 20.
    assert held < 8, f"{held} database sessions held by 20 open SSE streams"
