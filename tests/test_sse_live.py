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


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sse_from_daphne_two_streams_two_reconnects_revocation_and_a_bad_cursor(tmp_path):
    import realtime
    from board.membership import add_member, remove_member

    owner = UserFactory()
    member = UserFactory()
    project = ProjectFactory(owner=owner)
    add_member(project, member)
    cookie = f"sessionid={session_for(member)}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}
    streams = f"project:{project.pk},user:{member.pk}"
    path = f"/realtime/sse/?streams={streams}"

    def open_stream(last_event_id: str | None = None) -> tuple[http.client.HTTPConnection, object]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"Cookie": cookie, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        return conn, response

    def seen(events: list[dict]) -> list[tuple[str, int]]:
        return [(e["data"]["stream"], e["data"]["seq"]) for e in events]

    with Daphne(env, tmp_path / "sse.log") as server:
        conn, response = open_stream()
        ItemFactory(project=project, title="a")
        realtime.emit(f"user:{member.pk}", "v1:note.added", {"n": 1})
        first = [read_event(response, time.monotonic() + 10) for _ in range(2)]
        conn.close()

        # Missed while away, on both streams; the cursor of the last event resumes both.
        ItemFactory(project=project, title="b")
        realtime.emit(f"user:{member.pk}", "v1:note.added", {"n": 2})
        conn, response = open_stream(first[-1]["id"])
        second = [read_event(response, time.monotonic() + 10) for _ in range(2)]
        last = dict(seen(first))
        assert sorted(seen(second)) == sorted((stream, seq + 1) for stream, seq in last.items())
        conn.close()

        user_stream = f"user:{member.pk}"
        realtime.emit(user_stream, "v1:note.added", {"n": 3})
        conn, response = open_stream(second[-1]["id"])
        third = read_event(response, time.monotonic() + 10)
        # Nothing twice, nothing skipped.
        assert seen([third]) == [(user_stream, last[user_stream] + 2)]

        # Revoked while connected: that stream ends, the other goes on.
        remove_member(project, member)
        gone = read_event(response, time.monotonic() + 10)
        if gone["event"] == "v1:project.updated":  # the member change, sent before it applies
            gone = read_event(response, time.monotonic() + 10)
        assert gone["event"] == "unsubscribed"
        assert gone["data"]["stream"] == f"project:{project.pk}"
        ItemFactory(project=project, title="not for the member any more")
        realtime.emit(user_stream, "v1:note.added", {"n": 4})
        after = read_event(response, time.monotonic() + 10)
        assert after["data"]["data"] == {"n": 4}  # the project's item never came
        conn.close()

        # A cursor that cannot be read starts now with a reset per stream, never a 500.
        path = f"/realtime/sse/?streams=user:{member.pk}"
        conn, response = open_stream("not-a-cursor")
        reset = read_event(response, time.monotonic() + 10)
        assert (reset["event"], reset["data"]["stream"], reset["data"]["seq"]) == (
            "reset",
            user_stream,
            after["data"]["seq"],
        )
        conn.close()
        assert "Traceback" not in server.output()
