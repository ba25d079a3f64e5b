"""Server-sent events: resume by Last-Event-ID on every stream, resets, revocation, logout."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from board.membership import add_member, remove_member
from realtime.cursor import decode

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


class SSEReader:
    """Parses the SSE body of a streaming response into messages."""

    def __init__(self, response) -> None:
        self.response = response
        self.chunks = response.streaming_content.__aiter__()
        self.buffer = ""

    async def message(self, timeout: float = 5) -> dict:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while "\n\n" not in self.buffer:
                self.buffer += (await self.chunks.__anext__()).decode()
        block, self.buffer = self.buffer.split("\n\n", 1)
        fields: dict = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                fields.setdefault("comment", line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
        return fields

    async def event(self, kind: str | None = None, timeout: float = 5) -> dict:  # noqa: ASYNC109
        while True:
            message = await self.message(timeout)
            if "event" in message and (kind is None or message["event"] == kind):
                return message

    async def close(self) -> None:
        await self.chunks.aclose()


async def open_sse(
    user, streams: str, last_event_id: str | None = None, **query: str
) -> tuple[SSEReader, dict]:
    client = AsyncClient()
    await client.aforce_login(user)
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    response = await client.get("/realtime/sse/", {"streams": streams, **query}, headers=headers)
    assert response.status_code == 200, response.content
    reader = SSEReader(response)
    first = await reader.message()
    return reader, {"response": response, "first": first}


async def test_sse_headers_and_retry_and_live_events():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    reader, opened = await open_sse(owner, f"project:{project.pk}")
    response = opened["response"]
    assert response["Content-Type"] == "text/event-stream"
    assert response["Cache-Control"] == "no-store"
    assert response["X-Accel-Buffering"] == "no"
    assert opened["first"] == {"retry": "3000"}
    await db(ItemFactory)(project=project, title="live")
    message = await reader.event()
    assert message["event"] == "v1:item.created"
    assert message["data"]["op"] == "event"
    assert message["data"]["data"]["title"] == "live"
    assert decode(message["id"])[f"project:{project.pk}"].seq == message["data"]["seq"]
    await reader.close()


async def test_resume_by_last_event_id_across_two_reconnects_on_two_streams():
    import realtime

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    streams = f"project:{project.pk},user:{owner.pk}"
    reader, _ = await open_sse(owner, streams)
    await db(ItemFactory)(project=project, title="a")
    await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": 1})
    first = [await reader.event(), await reader.event()]
    last_id = first[-1]["id"]
    await reader.close()

    # Missed while away: two items and a note.
    await db(ItemFactory)(project=project, title="b")
    await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": 2})
    await db(ItemFactory)(project=project, title="c")

    reader, _ = await open_sse(owner, streams, last_event_id=last_id)
    second = [await reader.event() for _ in range(3)]
    assert sorted((m["data"]["stream"], m["data"]["seq"]) for m in second) == sorted(
        [(f"project:{project.pk}", 3), (f"project:{project.pk}", 4), (f"user:{owner.pk}", 2)]
    )
    last_id = second[-1]["id"]
    await reader.close()

    await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": 3})
    reader, _ = await open_sse(owner, streams, last_event_id=last_id)
    third = await reader.event()
    assert (third["data"]["stream"], third["data"]["seq"]) == (f"user:{owner.pk}", 3)
    with pytest.raises(TimeoutError):
        await reader.event(timeout=0.5)  # nothing twice
    await reader.close()


async def test_a_stream_started_now_says_where_so_a_reconnect_before_an_event_misses_nothing():
    import realtime

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(ItemFactory)(project=project, title="history")  # not replayed
    streams = f"project:{project.pk},user:{owner.pk}"
    await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": 1})
    reader, _ = await open_sse(owner, streams)
    placed = await reader.message()
    assert set(placed) == {"id"}  # no event: only the browser's Last-Event-ID moves
    from realtime.feed import position

    now = {stream: (await db(position)(stream)).seq for stream in streams.split(",")}
    assert now[f"user:{owner.pk}"] == 1
    assert {s: p.seq for s, p in decode(placed["id"]).items()} == now
    await reader.close()

    # Committed while away, before the first stream delivered anything.
    await db(ItemFactory)(project=project, title="missed")
    reader, _ = await open_sse(owner, streams, last_event_id=placed["id"])
    missed = await reader.event()
    assert missed["data"]["seq"] == now[f"project:{project.pk}"] + 1
    assert missed["data"]["data"]["title"] == "missed"
    await reader.close()


async def test_a_stream_resumed_on_every_stream_sends_no_extra_id():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    reader, _ = await open_sse(owner, f"project:{project.pk}")
    placed = await reader.message()
    await reader.close()
    reader, _ = await open_sse(owner, f"project:{project.pk}", last_event_id=placed["id"])
    with pytest.raises(TimeoutError):
        await reader.message(timeout=0.3)
    await reader.close()


@pytest.mark.parametrize(
    "bad_id",
    [
        "garbage",
        "eyJ4IjpbMV19",
        base64.urlsafe_b64encode(b'{"x":' + b"[" * 11_000).decode().rstrip("="),  # too deep
    ],
)
async def test_malformed_last_event_id_gives_reset_events_not_an_error(bad_id):
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    reader, _ = await open_sse(owner, f"project:{project.pk}", last_event_id=bad_id)
    reset = await reader.event("reset")
    assert reset["data"] == {
        "op": "reset",
        "stream": f"project:{project.pk}",
        "epoch": reset["data"]["epoch"],
        "seq": 1,
    }
    await db(ItemFactory)(project=project)
    assert (await reader.event())["data"]["seq"] == 2
    await reader.close()


async def test_refused_and_missing_streams_are_403_alike():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stranger = await db(UserFactory)()
    client = AsyncClient()
    await client.aforce_login(stranger)
    refused = await client.get("/realtime/sse/", {"streams": f"project:{project.pk}"})
    missing = await client.get("/realtime/sse/", {"streams": "project:999999"})
    assert refused.status_code == missing.status_code == 403
    assert refused.json()["error"]["code"] == missing.json()["error"]["code"] == "forbidden"
    anonymous = await AsyncClient().get("/realtime/sse/", {"streams": "user:1"})
    assert anonymous.status_code == 401


async def test_revocation_ends_delivery_of_that_stream():
    owner = await db(UserFactory)()
    member = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    reader, _ = await open_sse(member, f"project:{project.pk},user:{member.pk}")
    await db(remove_member)(project, member)
    gone = await reader.event("unsubscribed", timeout=2)
    assert gone["data"] == {
        "op": "unsubscribed",
        "stream": f"project:{project.pk}",
        "reason": "forbidden",
    }
    await db(ItemFactory)(project=project, title="secret")
    import realtime

    await db(realtime.emit)(f"user:{member.pk}", "v1:note.added", {"still": "here"})
    message = await reader.event()
    assert message["data"]["stream"] == f"user:{member.pk}"  # the other stream goes on
    await reader.close()


async def started_stream():
    """An SSE connection of a new user to their own stream, its body past the `retry:`."""
    from realtime import sse
    from realtime.feed import starting_positions

    user = await db(UserFactory)()
    stream = f"user:{user.pk}"
    start = await db(starting_positions)([stream], None)
    connection = sse.SSEConnection(user, [stream], start.positions)
    body = connection.run([], limit=20)
    assert (await body.__anext__()).startswith("retry:")
    return connection, body


async def test_an_event_queued_while_a_chunk_is_written_goes_out_without_waiting(monkeypatch):
    from realtime import sse

    monkeypatch.setattr(sse, "HEARTBEAT", 30.0)  # a lost wake-up would sleep this long
    connection, body = await started_stream()
    waiting = asyncio.ensure_future(body.__anext__())
    await asyncio.sleep(0.2)  # past the replay: the body waits for its wake-up
    assert not waiting.done()
    connection.enqueue("data: first\n\n")
    assert await waiting == "data: first\n\n"
    # The body is suspended where it wrote that chunk; a new event comes in meanwhile.
    connection.enqueue("data: second\n\n")
    async with asyncio.timeout(2):
        assert await body.__anext__() == "data: second\n\n"
    await body.aclose()


async def test_logout_ends_the_stream():
    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")
    from realtime.invalidation import _send

    await db(_send)([owner.pk], "realtime.logout")
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=2)


async def test_a_lost_logout_message_is_made_up_for_by_the_next_decision():
    from django.contrib.sessions.models import Session

    from realtime.invalidation import _send

    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")
    # Logged out elsewhere (the session is flushed) and the logout message was lost.
    await db(lambda: Session.objects.all().delete())()
    await db(_send)([owner.pk], "realtime.authz")  # the periodic recheck, or any change
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=3)


async def test_an_expired_session_ends_the_stream_at_the_next_decision():
    import datetime as dt

    from django.contrib.sessions.models import Session
    from django.utils import timezone

    from realtime.invalidation import _send

    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")
    # Expired, not yet removed (`clearsessions` has not run): any request now is anonymous.
    expired = timezone.now() - dt.timedelta(seconds=1)
    await db(lambda: Session.objects.update(expire_date=expired))()
    await db(_send)([owner.pk], "realtime.authz")  # the periodic recheck, or any change
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=3)


async def test_a_decision_keeps_a_stream_whose_session_is_still_signed_in():
    from realtime.invalidation import _send

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    reader, _ = await open_sse(owner, f"project:{project.pk}")
    await db(_send)([owner.pk], "realtime.authz")
    await asyncio.sleep(0.3)
    await db(ItemFactory)(project=project, title="still here")
    assert (await reader.event("v1:item.created"))["data"]["data"]["title"] == "still here"
    await reader.close()


async def test_a_password_change_ends_the_stream_of_another_session():
    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")

    def change_password() -> None:
        owner.set_password("a-new-password-123")
        owner.save()

    await db(change_password)()
    with pytest.raises(StopAsyncIteration):
        await reader.event(timeout=3)


async def test_a_demoted_superuser_loses_the_stream():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    admin = await db(UserFactory)(is_superuser=True)
    reader, _ = await open_sse(admin, f"project:{project.pk},user:{admin.pk}")
    admin.is_superuser = False
    await db(admin.save)()
    gone = await reader.event("unsubscribed", timeout=2)
    assert gone["data"]["stream"] == f"project:{project.pk}"
    await db(ItemFactory)(project=project, title="secret")
    import realtime

    await db(realtime.emit)(f"user:{admin.pk}", "v1:note.added", {"n": 1})
    assert (await reader.event())["data"]["stream"] == f"user:{admin.pk}"
    await reader.close()


async def test_reconnecting_after_revocation_is_refused():
    owner = await db(UserFactory)()
    member = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    reader, _ = await open_sse(member, f"project:{project.pk}")
    await db(ItemFactory)(project=project, title="seen")
    last_id = (await reader.event())["id"]
    await reader.close()
    await db(remove_member)(project, member)
    await db(ItemFactory)(project=project, title="missed, and not theirs any more")
    client = AsyncClient()
    await client.aforce_login(member)
    response = await client.get(
        "/realtime/sse/", {"streams": f"project:{project.pk}"}, headers={"Last-Event-ID": last_id}
    )
    assert response.status_code == 403
    assert b"missed" not in response.content


async def test_a_cursor_older_than_the_log_gives_a_reset():
    from realtime.models import Event

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    reader, _ = await open_sse(owner, stream)
    await db(ItemFactory)(project=project)
    old_id = (await reader.event())["id"]
    await reader.close()
    for _ in range(3):
        await db(ItemFactory)(project=project)
    # Retention took everything up to seq 3: what came after the cursor is partly gone.
    await db(Event.objects.filter(stream__name=stream, seq__lte=3).delete)()
    from realtime.models import Stream

    now = (await db(Stream.objects.get)(name=stream)).last_seq
    reader, _ = await open_sse(owner, stream, last_event_id=old_id)
    reset = await reader.event("reset")
    assert (reset["data"]["stream"], reset["data"]["seq"]) == (stream, now)
    await db(ItemFactory)(project=project)
    assert (await reader.event())["data"]["seq"] == now + 1
    await reader.close()


async def test_idle_stream_gets_a_heartbeat_comment(monkeypatch):
    from realtime import sse

    monkeypatch.setattr(sse, "HEARTBEAT", 0.2)
    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")
    assert set(await reader.message()) == {"id"}  # where the stream starts
    assert (await reader.message(timeout=2)) == {"comment": "heartbeat"}
    await reader.close()


async def test_connection_row_records_the_client_and_counts_toward_the_limit(settings):
    from board.models import Organization
    from realtime.models import Connection

    settings.REALTIME = {**getattr(settings, "REALTIME", {}), "MAX_CONNECTIONS_PER_USER": 1}
    owner = await db(UserFactory)()
    organization = await db(Organization.objects.create)(name="Acme")
    await db(organization.members.add)(owner)
    client = AsyncClient()
    await client.aforce_login(owner)
    response = await client.get("/realtime/sse/", {"streams": f"user:{owner.pk}", "v": "js/1.2"})
    reader = SSEReader(response)
    await reader.message()
    row = await db(Connection.objects.get)(user=owner)
    assert (row.transport, row.client_version, row.remote_addr) == ("sse", "js/1.2", "127.0.0.1")
    assert row.tenant == str(organization.pk)
    refused = await client.get("/realtime/sse/", {"streams": f"user:{owner.pk}"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    await reader.close()


async def test_an_sse_only_node_keeps_its_rows_fresh(settings):
    import datetime as dt

    from realtime.models import Connection

    settings.REALTIME = {**getattr(settings, "REALTIME", {}), "HEARTBEAT": 0.5}
    owner = await db(UserFactory)()
    reader, _ = await open_sse(owner, f"user:{owner.pk}")
    stale = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    await db(Connection.objects.filter(user=owner).update)(last_seen=stale)
    for _ in range(100):  # the node stamps its rows once per heartbeat
        row = await db(Connection.objects.get)(user=owner)
        if row.last_seen > stale:
            break
        await asyncio.sleep(0.1)
    assert row.last_seen > stale
    await reader.close()


async def test_a_stream_that_never_starts_leaves_no_row():
    from realtime.models import Connection

    owner = await db(UserFactory)()
    client = AsyncClient()
    await client.aforce_login(owner)
    # The response is made but its body never read (the client left before it began).
    response = await client.get("/realtime/sse/", {"streams": f"user:{owner.pk}"})
    assert response.status_code == 200
    del response
    assert not await db(Connection.objects.filter(user=owner).exists)()


async def test_a_closed_stream_leaves_nothing_running():
    from realtime.cursor import Position
    from realtime.fanout import get_hub
    from realtime.invalidation import _send
    from realtime.sse import SSEConnection

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    streams = [f"project:{project.pk}", f"user:{owner.pk}"]
    # The stream itself, as a server runs it: the test client's wrapper would not close it.
    connection = SSEConnection(owner, streams, {s: Position(0, None) for s in streams})
    body = connection.run([], 5)
    assert await body.__anext__() == "retry: 3000\n\n"
    hub = get_hub()
    assert all(hub.members.get(s) for s in streams)
    assert str(owner.pk) in hub.user_listeners
    await db(_send)([owner.pk], "realtime.authz")  # a decision in flight as it closes
    for _ in range(100):
        if connection.recheck is not None:
            break
        await asyncio.sleep(0.01)
    assert connection.recheck is not None
    await body.aclose()
    await asyncio.sleep(0)
    assert connection.recheck.done()
    assert not any(hub.members.get(s) for s in streams)
    assert str(owner.pk) not in hub.user_listeners
    from realtime.models import Connection

    assert not await db(Connection.objects.filter(pk=connection.connection_id).exists)()


async def test_a_lost_permission_message_is_made_up_for_by_the_periodic_recheck(
    settings, monkeypatch
):
    from realtime import invalidation, sse

    monkeypatch.setattr(sse, "HEARTBEAT", 0.2)
    settings.REALTIME = {**getattr(settings, "REALTIME", {}), "AUTHZ_RECHECK_INTERVAL": 0.5}
    owner = await db(UserFactory)()
    member = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    reader, _ = await open_sse(member, f"project:{project.pk},user:{member.pk}")
    monkeypatch.setattr(invalidation, "permissions_changed", lambda *a, **k: None)  # lost
    await db(remove_member)(project, member)
    gone = await reader.event("unsubscribed", timeout=3)
    assert gone["data"]["stream"] == f"project:{project.pk}"
    await reader.close()


async def test_a_stream_found_over_the_limit_when_its_body_starts_says_so(settings):
    """Both requests pass the view's count (no row yet); the second finds the first's row
    when its body starts. Its status is sent already, so the body says rate_limited and asks
    the browser to wait long before reconnecting."""
    settings.REALTIME = {**getattr(settings, "REALTIME", {}), "MAX_CONNECTIONS_PER_USER": 1}
    user = await db(UserFactory)()
    client = AsyncClient()
    await client.aforce_login(user)
    streams = {"streams": f"user:{user.pk}"}
    first = SSEReader(await client.get("/realtime/sse/", streams))
    second = SSEReader(await client.get("/realtime/sse/", streams))
    assert await first.message() == {"retry": "3000"}
    assert await second.message() == {"retry": "30000"}
    refused = await second.message()
    assert refused["event"] == "rate_limited"
    assert refused["data"]["error"]["code"] == "rate_limited"
    with pytest.raises(StopAsyncIteration):
        await second.message()
    await first.close()


async def test_events_pruned_after_the_cursor_was_checked_give_a_reset(settings, monkeypatch):
    """`realtime_prune` ran between the cursor's check and the replay's read of the log."""
    import realtime.replay
    from realtime.cursor import Position, encode
    from realtime.models import Event, Stream

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for _ in range(5):
        await db(ItemFactory)(project=project)
    stream = f"project:{project.pk}"
    row = await db(Stream.objects.get)(name=stream)
    original = realtime.replay.read_typed_after

    def pruning_read(name, after, limit):
        Event.objects.filter(stream__name=name, seq__lte=4).delete()
        return original(name, after, limit)

    monkeypatch.setattr(realtime.replay, "read_typed_after", pruning_read)
    cursor = encode({stream: Position(1, row.epoch)})
    reader, _ = await open_sse(owner, stream, last_event_id=cursor)
    message = await reader.event()
    # Not seq 5 on a state that lacks 2 to 4: a reset at the stream's position, and a cursor
    # that resumes from there.
    assert message["event"] == "reset"
    assert (message["data"]["stream"], message["data"]["seq"]) == (stream, row.last_seq)
    assert decode(message["id"])[stream].seq == row.last_seq
    await db(ItemFactory)(project=project)
    event = await reader.event()
    assert event["data"]["seq"] == row.last_seq + 1
    assert decode(event["id"])[stream].seq == row.last_seq + 1
    await reader.close()


async def test_every_event_pruned_after_the_cursor_was_checked_gives_a_reset(monkeypatch):
    """As above, but the prune left no event at all: the replay's read finds nothing, and no
    later row shows that 2 to 6 are gone."""
    import realtime.replay
    from realtime.cursor import Position, encode
    from realtime.models import Event, Stream

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for _ in range(5):
        await db(ItemFactory)(project=project)
    stream = f"project:{project.pk}"
    row = await db(Stream.objects.get)(name=stream)
    original = realtime.replay.read_typed_after

    def pruning_read(name, after, limit):
        Event.objects.filter(stream__name=name).delete()
        return original(name, after, limit)

    monkeypatch.setattr(realtime.replay, "read_typed_after", pruning_read)
    cursor = encode({stream: Position(1, row.epoch)})
    reader, _ = await open_sse(owner, stream, last_event_id=cursor)
    message = await reader.event()
    assert message["event"] == "reset"
    assert (message["data"]["stream"], message["data"]["seq"]) == (stream, row.last_seq)
    assert decode(message["id"])[stream].seq == row.last_seq
    monkeypatch.setattr(realtime.replay, "read_typed_after", original)
    await db(ItemFactory)(project=project)
    event = await reader.event()
    assert event["data"]["seq"] == row.last_seq + 1
    await reader.close()


async def test_access_revoked_during_a_replay_unsubscribes_and_sends_nothing_more(
    settings, monkeypatch
):
    import time

    import realtime
    import realtime.replay
    from realtime.cursor import Position, encode
    from realtime.models import Stream

    settings.REALTIME = {**getattr(settings, "REALTIME", {}), "REPLAY_BATCH": 2}
    owner, member = await db(UserFactory)(), await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    for n in range(6):
        await db(ItemFactory)(project=project, title=f"secret{n}")
    stream = f"project:{project.pk}"
    row = await db(Stream.objects.get)(name=stream)
    original = realtime.replay.read_typed_after
    reads = []

    def revoking_read(name, after, limit):
        if name == stream:
            reads.append(after)
            if len(reads) == 2:  # the replay's second batch: access goes meanwhile
                remove_member(project, member)
                time.sleep(1.0)  # the stream decides again while this batch is read
        return original(name, after, limit)

    monkeypatch.setattr(realtime.replay, "read_typed_after", revoking_read)
    client = AsyncClient()
    await client.aforce_login(member)
    response = await client.get(
        "/realtime/sse/",
        {"streams": f"{stream},user:{member.pk}"},
        headers={"Last-Event-ID": encode({stream: Position(0, row.epoch)})},
    )
    reader = SSEReader(response)
    seen = []
    while not seen or seen[-1].get("event") != "unsubscribed":
        seen.append(await reader.message(timeout=5))
    items = [m for m in seen if m.get("event", "").startswith("v1:item")]
    assert len(items) <= 2  # the batch read before the revocation, nothing after it
    await db(realtime.emit)(f"user:{member.pk}", "v1:note.added", {"n": 1})
    message = await reader.message()
    while "event" not in message:
        message = await reader.message()
    assert message["event"] == "v1:note.added"  # the stream still allowed goes on
    assert message["data"]["stream"] == f"user:{member.pk}"
    await reader.close()


async def test_access_revoked_while_the_stream_joins_its_streams(monkeypatch):
    from realtime import fanout

    owner, member = await db(UserFactory)(), await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    original = fanout.Hub.join
    joined = []

    async def slow_join(self, stream, subscriber):
        if stream.startswith("user:"):
            await asyncio.sleep(1.0)  # a slow group_add (Redis under load)
        joined.append(stream)
        return await original(self, stream, subscriber)

    monkeypatch.setattr(fanout.Hub, "join", slow_join)
    client = AsyncClient()
    await client.aforce_login(member)
    response = await client.get(
        "/realtime/sse/", {"streams": f"user:{member.pk},project:{project.pk}"}
    )
    reader = SSEReader(response)
    first = asyncio.ensure_future(reader.message(timeout=5))
    await asyncio.sleep(0.3)  # the body is joining user:<pk>
    await db(remove_member)(project, member)
    assert await first == {"retry": "3000"}
    gone = await reader.message(timeout=5)
    while gone.get("event") != "unsubscribed":
        gone = await reader.message(timeout=5)
    assert gone["data"]["stream"] == f"project:{project.pk}"
    # The revoked stream is not joined after its decision (a hub member nobody would leave).
    assert not fanout.get_hub().members.get(f"project:{project.pk}")
    await reader.close()


async def revoked_before_the_watch(monkeypatch):
    """A member of a new project, removed from it just before an SSE body watches the user:
    the removal's realtime.authz message then reaches no one."""
    from realtime import fanout

    owner, member = await db(UserFactory)(), await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(add_member)(project, member)
    original = fanout.Hub.watch_user

    async def revoked_first(self, user_pk, connection):
        if user_pk == member.pk:
            await db(remove_member)(project, member)
        return await original(self, user_pk, connection)

    monkeypatch.setattr(fanout.Hub, "watch_user", revoked_first)
    return member, project


async def test_access_revoked_before_the_stream_watches_its_user_is_decided_again(monkeypatch):
    """The view decides; a revocation's message sent before the body watches the user is lost."""
    from realtime import fanout

    member, project = await revoked_before_the_watch(monkeypatch)
    reader, _ = await open_sse(member, f"user:{member.pk},project:{project.pk}")
    gone = await reader.event(timeout=5)
    assert gone["event"] == "unsubscribed"  # before any event of the project
    assert gone["data"] == {
        "op": "unsubscribed",
        "stream": f"project:{project.pk}",
        "reason": "forbidden",
    }
    assert not fanout.get_hub().members.get(f"project:{project.pk}")
    await db(ItemFactory)(project=project, title="secret")
    import realtime

    await db(realtime.emit)(f"user:{member.pk}", "v1:note.added", {"still": "here"})
    message = await reader.event()
    assert message["data"]["stream"] == f"user:{member.pk}"  # the secret was not sent first
    await reader.close()


async def test_a_stream_refused_everything_before_it_watched_its_user_ends(monkeypatch):
    from realtime import fanout

    member, project = await revoked_before_the_watch(monkeypatch)
    reader, opened = await open_sse(member, f"project:{project.pk}")
    assert opened["first"] == {"retry": "3000"}
    gone = await reader.message()
    assert gone["event"] == "unsubscribed"
    assert gone["data"]["stream"] == f"project:{project.pk}"
    with pytest.raises(StopAsyncIteration):  # nothing left to stream: the body ends
        await reader.message()
    assert not fanout.get_hub().members.get(f"project:{project.pk}")
    assert str(member.pk) not in fanout.get_hub().user_listeners


@pytest.mark.parametrize("stuck", ["join", "watch_user"])
async def test_a_group_the_layer_cannot_join_ends_the_stream_without_raising(monkeypatch, stuck):
    from realtime import fanout
    from realtime.models import Connection

    user = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=user)

    async def refused(self, key, member):
        raise TimeoutError("the channel layer did not answer")

    monkeypatch.setattr(fanout.Hub, stuck, refused)
    client = AsyncClient()
    await client.aforce_login(user)
    response = await client.get("/realtime/sse/", {"streams": f"project:{project.pk}"})
    assert response.status_code == 200
    reader = SSEReader(response)
    assert await reader.message() == {"retry": "3000"}  # the browser comes back after it
    with pytest.raises(StopAsyncIteration):
        await reader.message()
    assert not fanout.get_hub().members.get(f"project:{project.pk}")
    assert not await db(Connection.objects.filter(user=user).exists)()


async def test_a_stream_cancelled_again_while_it_leaves_still_releases_its_row(monkeypatch):
    """Daphne cancels a closing application again every second; a stuck layer makes each
    leave wait. The row and the user's watch must go all the same."""
    from realtime import fanout
    from realtime.models import Connection

    original = fanout.Hub.leave

    async def slow_leave(self, stream, subscriber):
        await asyncio.sleep(0.5)  # a layer slow to answer the group_discard
        return await original(self, stream, subscriber)

    monkeypatch.setattr(fanout.Hub, "leave", slow_leave)
    user = await db(UserFactory)()
    reader, _ = await open_sse(user, f"user:{user.pk}")
    assert await db(Connection.objects.filter(user=user).exists)()
    assert "id" in await reader.message()  # where it starts; then it waits for an event
    body = asyncio.ensure_future(reader.message(timeout=30))
    await asyncio.sleep(0.1)
    body.cancel()  # the browser left: the body is cancelled, and starts leaving
    await asyncio.sleep(0.1)
    body.cancel()  # the server's next cancel, while the leave still waits
    with pytest.raises(asyncio.CancelledError):
        await body
    async with asyncio.timeout(5):  # released by a background task: nothing to wait on
        while await db(Connection.objects.filter(user=user).exists)():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        while str(user.pk) in fanout.get_hub().user_listeners:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert not fanout.get_hub().members.get(f"user:{user.pk}")


async def test_a_method_other_than_get_is_405_with_allow():
    owner = await db(UserFactory)()
    client = AsyncClient()
    await client.aforce_login(owner)
    for method in (client.post, client.put, client.delete):
        response = await method(f"/realtime/sse/?streams=user:{owner.pk}")
        assert response.status_code == 405
        assert response["Allow"] == "GET"


async def test_a_client_too_slow_for_its_queue_is_ended_without_the_queue(monkeypatch):
    """It resumes by Last-Event-ID: writing out what was queued would only hold the stream
    open (and its hub membership and row) for a client that does not read."""
    from realtime import sse
    from realtime.models import Connection

    monkeypatch.setattr(sse, "MAX_QUEUED", 5)
    connection, body = await started_stream()
    for n in range(6):  # the client reads nothing meanwhile
        connection.enqueue(f"data: {n}\n\n")
    rest = [chunk async for chunk in body]
    assert rest == []
    assert not await db(Connection.objects.filter(pk=connection.connection_id).exists)()


async def test_version_picks_the_frames_and_without_one_each_event_has_its_primary(
    item_v2, settings
):
    settings.REALTIME = {"DEFAULT_VERSION": "v2"}
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    readers = {
        version: (await open_sse(owner, stream, **({"version": version} if version else {})))[0]
        for version in ("v1", None, "v7")
    }
    await db(ItemFactory)(project=project, title="both")
    v1, default, v7 = [await reader.event() for reader in readers.values()]
    for message in (v1, default, v7):
        assert message["event"] == message["data"]["type"]
    assert v1["data"]["type"] == "v1:item.created"
    assert v1["data"]["data"]["title"] == "both"
    assert default["data"]["type"] == "v2:item.created"
    assert default["data"]["data"] == {"id": v1["data"]["data"]["id"], "label": "both"}
    assert (v1["data"]["seq"], v1["data"]["eventId"]) == (
        default["data"]["seq"],
        default["data"]["eventId"],
    )
    assert v7["data"] == default["data"]  # a version the event lacks: its primary, as on a socket
    for reader in readers.values():
        await reader.close()

    # A resume replays in the version asked for too.
    await db(ItemFactory)(project=project, title="missed")
    reader, _ = await open_sse(owner, stream, last_event_id=v1["id"], version="v1")
    replayed = await reader.event()
    assert (replayed["event"], replayed["data"]["data"]["title"]) == ("v1:item.created", "missed")
    await reader.close()


@pytest.mark.parametrize("version", ["2", "v0", "V1", "v12345", "latest"])
async def test_a_malformed_version_is_400_unsupported_version(version):
    owner = await db(UserFactory)()
    client = AsyncClient()
    await client.aforce_login(owner)
    response = await client.get(
        "/realtime/sse/", {"streams": f"user:{owner.pk}", "version": version}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_version"
    assert response.json()["error"]["message"]


async def test_streams_revoked_together_stop_together_while_the_first_ones_leave_is_awaited():
    """As on a socket: a decision refusing two streams stops both before the first one's
    leave (and its hooks) is awaited; an event committed meanwhile on the second one is not
    sent."""
    from realtime import hooks

    from .test_authz import remove_from_both, slow_first_leave

    member = await db(UserFactory)()
    first, second = await db(ProjectFactory)(), await db(ProjectFactory)()
    for project in (first, second):
        await db(add_member)(project, member)
    other = {f"project:{first.pk}": second, f"project:{second.pk}": first}
    slow = slow_first_leave(other)
    hooks.register_hooks(slow)
    try:
        reader, _ = await open_sse(member, ",".join([*other, f"user:{member.pk}"]))
        await db(remove_from_both)(first, second, member)
        seen = []
        while len([m for m in seen if m["event"] == "unsubscribed"]) < 2:
            seen.append(await reader.event(timeout=5))
        await asyncio.wait_for(slow.done.wait(), 5)  # the leaves are done: nothing is held back
        import realtime

        await db(realtime.emit)(f"user:{member.pk}", "v1:note.added", {"last": True})
        while True:  # everything up to an event sent after the decision
            seen.append(await reader.event(timeout=5))
            if seen[-1]["data"].get("stream") == f"user:{member.pk}":
                break
        await reader.close()
    finally:
        hooks.unregister_hooks(slow)
    assert slow.waited
    titles = [m["data"].get("data", {}).get("title") for m in seen]
    assert "after the decision" not in titles
