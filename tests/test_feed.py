"""The event feed and long poll: /api/realtime/events/."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from realtime.cursor import Position, decode, encode

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


async def logged_in(user) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def setup_project(items: int = 0):
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for n in range(items):
        await db(ItemFactory)(project=project, title=f"i{n}")
    return owner, project


async def test_events_after_a_cursor_in_order_then_none():
    owner, project = await setup_project(items=3)
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    cursor = encode({stream: Position(1, None)})
    response = await client.get("/api/realtime/events/", {"streams": stream, "cursor": cursor})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert [e["seq"] for e in body["events"]] == [2, 3, 4]
    assert [e["data"]["title"] for e in body["events"]] == ["i0", "i1", "i2"]
    assert decode(body["cursor"])[stream].seq == 4
    again = await client.get("/api/realtime/events/", {"streams": stream, "cursor": body["cursor"]})
    assert again.json()["events"] == []


async def test_limit_pages_through_several_streams_without_skipping():
    owner, project = await setup_project(items=4)
    client = await logged_in(owner)
    streams = f"project:{project.pk},user:{owner.pk}"
    import realtime

    for n in range(3):
        await db(realtime.emit)(f"user:{owner.pk}", "v1:note.added", {"n": n})
    cursor = encode(
        {f"project:{project.pk}": Position(0, None), f"user:{owner.pk}": Position(0, None)}
    )
    seen: list[tuple[str, int]] = []
    for _ in range(10):
        body = (
            await client.get(
                "/api/realtime/events/", {"streams": streams, "cursor": cursor, "limit": 2}
            )
        ).json()
        seen += [(e["stream"], e["seq"]) for e in body["events"]]
        cursor = body["cursor"]
        if not body["events"]:
            break
    assert sorted(s for s in seen if s[0].startswith("project")) == [
        (f"project:{project.pk}", n) for n in range(1, 6)
    ]
    assert sorted(s for s in seen if s[0].startswith("user")) == [
        (f"user:{owner.pk}", n) for n in range(1, 4)
    ]
    assert len(seen) == len(set(seen))


async def test_without_cursor_starts_now():
    owner, project = await setup_project(items=2)
    client = await logged_in(owner)
    body = (await client.get("/api/realtime/events/", {"streams": f"project:{project.pk}"})).json()
    assert body["events"] == []
    assert body["resets"] == []
    assert decode(body["cursor"])[f"project:{project.pk}"].seq == 3


async def test_unrecoverable_cursor_gives_a_reset_and_the_current_position():
    owner, project = await setup_project(items=2)
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    cursor = encode({stream: Position(1, "another-epoch")})
    body = (await client.get("/api/realtime/events/", {"streams": stream, "cursor": cursor})).json()
    [reset] = body["resets"]
    assert reset["op"] == "reset"
    assert reset["stream"] == stream
    assert reset["seq"] == 3
    assert body["events"] == []


# JSON nested 11,000 deep, under the cursor's length limit: json.loads raises RecursionError.
DEEP_CURSOR = base64.urlsafe_b64encode(b'{"user:1":' + b"[" * 11_000).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ({}, 400, "invalid_frame"),
        ({"streams": "bad name"}, 400, "invalid_stream"),
        ({"streams": "nope:1"}, 400, "unknown_stream"),
        ({"streams": "user:{me}", "limit": "many"}, 400, "invalid_parameter"),
        ({"streams": "user:{me}", "limit": "0"}, 400, "invalid_parameter"),
        ({"streams": "user:{me}", "wait": "26"}, 400, "invalid_parameter"),
        ({"streams": "user:{me}", "cursor": "%%%"}, 400, "invalid_cursor"),
        (
            {"streams": "user:{me}", "cursor": encode({"user:1": Position(0, None)})[:-3] + "zzz"},
            400,
            "invalid_cursor",
        ),
        ({"streams": "user:{me}", "cursor": DEEP_CURSOR}, 400, "invalid_cursor"),
        ({"streams": "project:987654"}, 403, "forbidden"),
        ({"streams": "user:{other}"}, 403, "forbidden"),
        ({"streams": "user:{me}", "version": "2"}, 400, "unsupported_version"),
        ({"streams": "user:{me}", "version": "v0"}, 400, "unsupported_version"),
        ({"streams": "user:{me}", "version": "V1"}, 400, "unsupported_version"),
        ({"streams": "user:{me}", "version": "v12345"}, 400, "unsupported_version"),
    ],
)
async def test_bad_parameters_are_answered_with_a_message(query, status, code):
    me = await db(UserFactory)()
    other = await db(UserFactory)()
    client = await logged_in(me)
    query = {k: v.format(me=me.pk, other=other.pk) for k, v in query.items()}
    response = await client.get("/api/realtime/events/", query)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def test_anonymous_is_refused_with_401():
    response = await AsyncClient().get("/api/realtime/events/", {"streams": "user:1"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


async def test_a_method_other_than_get_is_405_with_allow():
    owner = await db(UserFactory)()
    client = await logged_in(owner)
    for method in (client.post, client.put, client.delete, client.head):
        response = await method("/api/realtime/events/?streams=user:1")
        assert response.status_code == 405
        assert response["Allow"] == "GET"


async def test_long_poll_returns_as_soon_as_an_event_commits():
    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    first = (await client.get("/api/realtime/events/", {"streams": stream})).json()

    async def save_later():
        await asyncio.sleep(0.3)
        await db(ItemFactory)(project=project, title="late")

    started = time.monotonic()
    saver = asyncio.create_task(save_later())
    response = await client.get(
        "/api/realtime/events/", {"streams": stream, "cursor": first["cursor"], "wait": "10"}
    )
    elapsed = time.monotonic() - started
    await saver
    assert [e["data"]["title"] for e in response.json()["events"]] == ["late"]
    assert elapsed < 5  # woke on the event, not at the end of the wait


async def test_long_poll_times_out_with_no_events_and_the_same_cursor():
    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    first = (await client.get("/api/realtime/events/", {"streams": stream})).json()
    started = time.monotonic()
    body = (
        await client.get(
            "/api/realtime/events/", {"streams": stream, "cursor": first["cursor"], "wait": "0.5"}
        )
    ).json()
    assert time.monotonic() - started >= 0.5
    assert body["events"] == []
    assert decode(body["cursor"]) == decode(first["cursor"])


async def test_etag_gives_304_while_nothing_new_and_200_once_something_commits():
    owner, project = await setup_project(items=1)
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    first = await client.get(
        "/api/realtime/events/", {"streams": stream, "cursor": encode({stream: Position(0, None)})}
    )
    body = first.json()
    assert len(body["events"]) == 2  # the project and its item
    caught_up = await client.get(
        "/api/realtime/events/", {"streams": stream, "cursor": body["cursor"]}
    )
    etag = caught_up["ETag"]
    assert caught_up.json()["events"] == []
    params = {"streams": stream, "cursor": body["cursor"]}
    unchanged = await client.get("/api/realtime/events/", params, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert not unchanged.has_header("Content-Type")  # a 304 has no body to name the type of
    assert unchanged["Cache-Control"] == "no-store"
    assert unchanged["ETag"] == etag
    await db(ItemFactory)(project=project, title="new")
    changed = await client.get("/api/realtime/events/", params, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert [e["data"]["title"] for e in changed.json()["events"]] == ["new"]
    assert changed["ETag"] != etag


async def test_long_poll_decides_again_after_waiting():
    from board.membership import add_member, remove_member

    _owner, project = await setup_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    client = await logged_in(member)
    stream = f"project:{project.pk}"
    first = (await client.get("/api/realtime/events/", {"streams": stream})).json()

    async def revoke_then_save():
        await asyncio.sleep(0.3)
        await db(remove_member)(project, member)
        await db(ItemFactory)(project=project, title="after revocation")

    changer = asyncio.create_task(revoke_then_save())
    response = await client.get(
        "/api/realtime/events/", {"streams": stream, "cursor": first["cursor"], "wait": "5"}
    )
    await changer
    assert response.status_code == 403
    assert b"after revocation" not in response.content
    assert response.json()["error"]["code"] == "forbidden"


async def test_a_refusal_names_every_refused_stream_so_a_client_can_ask_for_the_rest():
    me = await db(UserFactory)()
    other = await db(UserFactory)()
    client = await logged_in(me)
    refused = [f"user:{other.pk}", "project:987654"]  # another's and a missing one alike
    streams = [refused[0], f"user:{me.pk}", refused[1]]
    response = await client.get("/api/realtime/events/", {"streams": ",".join(streams)})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert response.json()["error"]["streams"] == refused
    rest = await client.get("/api/realtime/events/", {"streams": f"user:{me.pk}"})
    assert rest.status_code == 200
    sse = await client.get("/realtime/sse/", {"streams": ",".join(streams)})
    assert sse.status_code == 403
    assert sse.json()["error"]["streams"] == refused


async def test_events_pruned_after_the_cursor_was_checked_give_a_reset(monkeypatch):
    """`realtime_prune` ran between the cursor's check and the read of the log."""
    import realtime.feed
    from realtime.models import Event, Stream

    owner, project = await setup_project(items=4)
    other = await db(ProjectFactory)(owner=owner)
    await db(ItemFactory)(project=other)
    client = await logged_in(owner)
    stream, untouched = f"project:{project.pk}", f"project:{other.pk}"
    row = await db(Stream.objects.get)(name=stream)
    original = realtime.feed._read_after

    def pruning_read(after, limit):
        Event.objects.filter(stream__name=stream, seq__lte=3).delete()
        return original(after, limit)

    monkeypatch.setattr(realtime.feed, "_read_after", pruning_read)
    cursor = encode({stream: Position(1, row.epoch), untouched: Position(1, None)})
    response = await client.get(
        "/api/realtime/events/", {"streams": f"{stream},{untouched}", "cursor": cursor}
    )
    body = response.json()
    # Not seqs 4 and 5 on a state that lacks 2 and 3: a reset at the stream's position.
    assert body["resets"] == [
        {"op": "reset", "stream": stream, "epoch": row.epoch, "seq": row.last_seq}
    ]
    assert [(e["stream"], e["seq"]) for e in body["events"]] == [(untouched, 2)]
    positions = decode(body["cursor"])
    assert positions[stream].seq == row.last_seq
    assert positions[untouched].seq == 2


async def held_across(change):
    """A long poll of a new owner's project, held while `change(owner)` runs and an item is
    saved after it; its answer."""
    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    first = (await client.get("/api/realtime/events/", {"streams": stream})).json()

    async def change_then_save():
        await asyncio.sleep(0.3)
        await db(change)(owner)
        await db(ItemFactory)(project=project, title="after the change")

    changer = asyncio.create_task(change_then_save())
    response = await client.get(
        "/api/realtime/events/", {"streams": stream, "cursor": first["cursor"], "wait": "5"}
    )
    await changer
    return response


async def test_a_long_poll_held_across_a_logout_hands_out_nothing():
    """The session is gone after the wait (a logout elsewhere, the logout message lost)."""
    from django.contrib.sessions.models import Session

    response = await held_across(lambda owner: Session.objects.all().delete())
    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "not_authenticated"
    assert b"after the change" not in response.content


async def test_a_long_poll_held_across_a_password_change_hands_out_nothing():
    def change_password(owner):
        owner.set_password("another")
        owner.save()

    response = await held_across(change_password)
    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "not_authenticated"
    assert b"after the change" not in response.content


async def test_version_picks_the_frames_and_without_one_each_event_has_its_primary(
    item_v2, settings
):
    settings.REALTIME = {"DEFAULT_VERSION": "v2"}
    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    cursor = encode({stream: Position(1, None)})  # after the project's own event
    await db(ItemFactory)(project=project, title="both")

    async def read(**version):
        query = {"streams": stream, "cursor": cursor, **version}
        response = await client.get("/api/realtime/events/", query)
        assert response.status_code == 200, response.content
        [event] = response.json()["events"]
        return event

    v1, default, v2 = await read(version="v1"), await read(), await read(version="v2")
    assert v1["type"] == "v1:item.created"
    assert v1["data"]["title"] == "both"
    assert default == v2
    assert v2["type"] == "v2:item.created"
    assert v2["data"] == {"id": v1["data"]["id"], "label": "both"}
    assert (v1["seq"], v1["eventId"]) == (v2["seq"], v2["eventId"])
    # A version the event lacks gets its primary frame, as over the WebSocket.
    assert await read(version="v7") == default


async def test_a_long_poll_hands_out_the_version_asked_for(item_v2):
    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    now = (await client.get("/api/realtime/events/", {"streams": stream})).json()["cursor"]
    query = {"streams": stream, "cursor": now, "wait": "5", "version": "v2"}
    poll = asyncio.ensure_future(client.get("/api/realtime/events/", query))
    await asyncio.sleep(0.3)
    await db(ItemFactory)(project=project, title="later")
    [event] = (await asyncio.wait_for(poll, 5)).json()["events"]
    assert event["type"] == "v2:item.created"
    assert event["data"]["label"] == "later"


async def test_events_pruned_past_the_whole_page_after_the_check_give_a_reset(monkeypatch):
    """As above, but the read's page (`limit`) falls entirely in the pruned front: no event
    is read at all, which must not pass for "nothing new"."""
    import realtime.feed
    from realtime.models import Event, Stream

    owner, project = await setup_project(items=4)
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    row = await db(Stream.objects.get)(name=stream)
    original = realtime.feed._read_after

    def pruning_read(after, limit):
        Event.objects.filter(stream__name=stream, seq__lte=3).delete()
        return original(after, limit)

    monkeypatch.setattr(realtime.feed, "_read_after", pruning_read)
    cursor = encode({stream: Position(1, row.epoch)})
    body = (
        await client.get("/api/realtime/events/", {"streams": stream, "cursor": cursor, "limit": 2})
    ).json()
    assert body["events"] == []
    assert body["resets"] == [
        {"op": "reset", "stream": stream, "epoch": row.epoch, "seq": row.last_seq}
    ]
    assert decode(body["cursor"])[stream].seq == row.last_seq


def waker_streams():
    from realtime.api import _Waker
    from realtime.fanout import get_hub

    return [
        stream
        for stream, members in get_hub().members.items()
        if any(isinstance(member, _Waker) for member in members)
    ]


async def test_a_long_poll_whose_join_fails_answers_503_and_stays_in_no_group(monkeypatch):
    from realtime.fanout import Hub

    owner, project = await setup_project()
    client = await logged_in(owner)
    real_join = Hub.join

    async def failing(self, stream, subscriber):
        if stream.startswith("project:"):  # the second stream: the first is joined by then
            raise ConnectionError("the channel layer is down")
        await real_join(self, stream, subscriber)

    monkeypatch.setattr(Hub, "join", failing)
    streams = f"user:{owner.pk},project:{project.pk}"
    response = await client.get("/api/realtime/events/", {"streams": streams, "wait": "1"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "internal_error"
    assert response["Retry-After"] == "1"
    assert waker_streams() == []  # the stream joined first was left again


async def test_a_long_poll_cancelled_while_it_joins_stays_in_no_group(monkeypatch):
    """The client went away (Django cancels the view) while the second stream was joined."""
    from realtime.fanout import Hub

    owner, project = await setup_project()
    client = await logged_in(owner)
    real_join = Hub.join
    joining = asyncio.Event()

    async def slow(self, stream, subscriber):
        if stream.startswith("project:"):
            joining.set()
            await asyncio.sleep(30)
        await real_join(self, stream, subscriber)

    monkeypatch.setattr(Hub, "join", slow)
    streams = f"user:{owner.pk},project:{project.pk}"
    poll = asyncio.create_task(
        client.get("/api/realtime/events/", {"streams": streams, "wait": "10"})
    )
    await asyncio.wait_for(joining.wait(), 5)
    assert waker_streams() == [f"user:{owner.pk}"]
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poll
    for _ in range(50):
        if not waker_streams():
            break
        await asyncio.sleep(0.02)
    assert waker_streams() == []


async def test_a_waiting_long_poll_counts_as_a_poll_connection():
    from realtime import metrics

    owner, project = await setup_project()
    client = await logged_in(owner)
    stream = f"project:{project.pk}"
    live, connects = metrics.CONNECTIONS.labels("poll"), metrics.CONNECTS.labels("poll")
    live_before, connects_before = live._value.get(), connects._value.get()
    await client.get("/api/realtime/events/", {"streams": stream})  # no wait: not counted
    assert connects._value.get() == connects_before

    poll = asyncio.create_task(
        client.get("/api/realtime/events/", {"streams": stream, "wait": "5"})
    )
    for _ in range(250):
        if live._value.get() == live_before + 1:
            break
        await asyncio.sleep(0.02)
    assert live._value.get() == live_before + 1  # while it waits
    assert connects._value.get() == connects_before + 1
    await db(ItemFactory)(project=project, title="wakes it")
    response = await poll
    assert [e["data"]["title"] for e in response.json()["events"]] == ["wakes it"]
    assert live._value.get() == live_before  # and no longer once it answered
    assert connects._value.get() == connects_before + 1


async def test_feed_reads_take_the_same_queries_for_one_stream_and_for_ten():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from realtime.feed import read_events, starting_positions

    owner = await db(UserFactory)()
    projects = [await db(ProjectFactory)(owner=owner) for _ in range(10)]
    for project in projects:
        await db(ItemFactory)(project=project)
    streams = [f"project:{project.pk}" for project in projects]

    def queries(names):
        with CaptureQueriesContext(connection) as captured:
            start = starting_positions(names, {name: Position(0, None) for name in names})
            events, _after, resets = read_events(start.positions, 100)
        assert len(events) == 2 * len(names)  # each project and its item
        assert not resets
        return len(captured)

    one, ten = await db(queries)(streams[:1]), await db(queries)(streams)
    assert one == ten == 3  # positions, then positions and events
