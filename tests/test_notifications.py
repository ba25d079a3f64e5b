"""Notifications: notify(), privacy of the REST API, read state as events, preferences, live
delivery on the WebSocket and SSE, replay, bulk notify in bounded queries, admin, template tag."""

from __future__ import annotations

import re
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import checks
from django.db import connection, transaction
from django.template import Context, Template
from django.test import Client, RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from notifications import notify
from notifications.models import Notification, Preference
from notifications.service import read_all, represent, set_read
from realtime.models import Event
from realtime.policies import UserPolicy, stream_kinds
from realtime.testing import RealtimeClient, flush, record_group_sends, session_for

from . import test_browser as e2e
from .factories import ProjectFactory, UserFactory
from .test_sse import open_sse

db = sync_to_async
BELL = "notifications/bell.html"
browser, server = e2e.browser, e2e.server  # real Chromium against daphne, for the bell


def events_of(user, type_prefix="v1:notification."):
    return list(
        Event.objects.filter(stream__name=f"user:{user.pk}", type__startswith=type_prefix)
        .order_by("seq")
        .values_list("type", "data")
    )


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# -- notify() --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_notify_stores_a_row_and_logs_its_event_after_commit_only():
    alice, bob = UserFactory(), UserFactory()
    project = ProjectFactory(owner=alice)
    flush()
    with record_group_sends() as sent:
        with transaction.atomic():
            (note,) = notify(bob, "commented on", actor=alice, target=project, data={"n": 1})
            assert sent == []  # nothing before commit
        flush()
    assert Notification.objects.get().recipient == bob
    ((type_, data),) = events_of(bob)
    assert type_ == "v1:notification.created"
    assert data == {**represent(note), "unread_count": 1}
    assert data["actor"] == {"type": "auth.user", "id": str(alice.pk), "repr": alice.username}
    assert data["target"]["type"] == "board.project"
    assert [group for group, _ in sent] == [f"rt.user.{bob.pk}"]


@pytest.mark.django_db
def test_a_removed_content_type_keeps_the_notifications_that_refer_to_it():
    from django.contrib.contenttypes.models import ContentType

    alice, bob = UserFactory(), UserFactory()
    project = ProjectFactory(owner=alice)
    (note,) = notify(bob, "commented on", actor=alice, target=project)
    shown = represent(note)
    # As `remove_stale_contenttypes` does once a model is gone: its permissions go with it.
    ContentType.objects.get_for_model(project).delete()
    ContentType.objects.clear_cache()
    note.refresh_from_db()
    assert note.target_content_type is None
    assert note.actor_content_type is not None
    assert represent(note) == shown  # the reader still sees what it was about
    body = client_for(bob).get("/api/notifications/").json()
    assert [row["target"]["type"] for row in body["results"]] == ["board.project"]


@pytest.mark.django_db
def test_a_rolled_back_notify_leaves_no_row_and_no_event():
    bob = UserFactory()

    def notify_then_fail():
        with transaction.atomic():
            notify(bob, "liked")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        notify_then_fail()
    assert not Notification.objects.exists()
    assert events_of(bob) == []


@pytest.mark.django_db
def test_recipients_may_be_a_user_a_queryset_or_an_iterable_and_duplicates_count_once():
    a, b, c = UserFactory(), UserFactory(), UserFactory()
    assert len(notify(a, "x")) == 1
    assert len(notify(get_user_model().objects.filter(pk__in=[a.pk, b.pk]), "x")) == 2
    assert len(notify([a, b, a, c.pk], "x")) == 3
    assert Notification.objects.filter(recipient=a).count() == 3
    assert [data["unread_count"] for _t, data in events_of(a)] == [1, 2, 3]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"verb": ""}, ValueError),
        ({"verb": "x", "level": "loud"}, ValueError),
        ({"verb": "x", "data": ["not", "a", "dict"]}, TypeError),
        ({"verb": "x", "data": {"when": object()}}, TypeError),
        ({"verb": "x", "target": "not a model"}, TypeError),
    ],
)
def test_bad_arguments_raise_before_anything_is_written(kwargs, error):
    bob = UserFactory()
    with pytest.raises(error):
        notify(bob, **kwargs)
    assert not Notification.objects.exists()


@pytest.mark.django_db
def test_bulk_notify_uses_a_bounded_number_of_queries():
    User = get_user_model()
    User.objects.bulk_create(User(username=f"bulk{i}") for i in range(2500))
    everyone = User.objects.filter(username__startswith="bulk")
    Preference.objects.create(user=everyone.order_by("pk").first(), muted_verbs=["announced"])
    with CaptureQueriesContext(connection) as small:
        notify(everyone.order_by("pk")[:10], "announced", batch_size=1000)
    with CaptureQueriesContext(connection) as large:
        created = notify(everyone, "announced", batch_size=1000)
    assert len(created) == 2500
    # 3 batches of a few statements each, no query per recipient. SQLite splits a bulk INSERT
    # by its 999-parameter limit (some dozens of rows a statement); PostgreSQL does not.
    queries = len(large.captured_queries)
    assert queries < 2500 / 20
    if connection.vendor == "postgresql":
        assert queries <= 3 * len(small.captured_queries)
    assert Event.objects.filter(type="v1:notification.created").count() == 10 - 1 + 2500 - 1
    second = everyone.order_by("pk")[1]  # in both calls, not muted
    assert list(
        Event.objects.filter(stream__name=f"user:{second.pk}").values_list("seq", "data__verb")
    ) == [(1, "announced"), (2, "announced")]
    muted = everyone.order_by("pk").first()
    assert not Event.objects.filter(stream__name=f"user:{muted.pk}").exists()
    assert Notification.objects.filter(recipient=muted).count() == 2


@pytest.mark.django_db
def test_muted_verbs_and_levels_are_stored_but_not_pushed():
    bob = UserFactory()
    Preference.objects.create(user=bob, muted_verbs=["liked"], muted_levels=["success"])
    notify(bob, "liked")
    notify(bob, "deployed", level="success")
    notify(bob, "commented on", level="warning")
    assert Notification.objects.filter(recipient=bob).count() == 3
    assert [data["verb"] for _t, data in events_of(bob)] == ["commented on"]
    # The count in the event includes the muted ones: it is the true unread count.
    assert events_of(bob)[0][1]["unread_count"] == 3


# -- REST --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_another_users_notifications_are_not_found_and_never_counted():
    alice, bob = UserFactory(), UserFactory()
    (secret,) = notify(alice, "mentioned you in")
    notify(bob, "liked")
    bob_client = client_for(bob)
    listed = bob_client.get("/api/notifications/").json()["results"]
    assert [n["verb"] for n in listed] == ["liked"]
    assert bob_client.get("/api/notifications/unread-count/").json() == {"unread_count": 1}
    url = f"/api/notifications/{secret.pk}/"
    assert bob_client.get(url).status_code == 404
    assert bob_client.post(f"{url}read/").status_code == 404
    assert bob_client.post(f"{url}unread/").status_code == 404
    assert bob_client.delete(url).status_code == 404
    bob_client.post("/api/notifications/read-all/")
    secret.refresh_from_db()
    assert secret.read_at is None
    assert secret.deleted_at is None
    assert client_for(alice).get(url).status_code == 200


@pytest.mark.django_db
def test_anonymous_gets_403_everywhere():
    bob = UserFactory()
    (note,) = notify(bob, "liked")
    anonymous = Client()
    for url in (
        "/api/notifications/",
        "/api/notifications/unread-count/",
        f"/api/notifications/{note.pk}/",
    ):
        assert anonymous.get(url).status_code == 403
    assert anonymous.post("/api/notifications/read-all/").status_code == 403


@pytest.mark.django_db
def test_read_unread_read_all_and_delete_are_events_with_the_unread_count():
    bob = UserFactory()
    first, second, third = (notify(bob, f"verb {i}")[0] for i in range(3))
    client = client_for(bob)
    response = client.post(f"/api/notifications/{first.pk}/read/")
    assert response.status_code == 200
    assert response.json()["unread"] is False
    assert response["X-Stream-Position"] == f"user:{bob.pk}=4"
    client.post(f"/api/notifications/{first.pk}/read/")  # already read: no event
    client.post(f"/api/notifications/{first.pk}/unread/")
    assert client.post("/api/notifications/read-all/").json() == {
        "ids": sorted([first.pk, second.pk, third.pk]),
        "count": 3,
        "unread_count": 0,
    }
    client.post(f"/api/notifications/{second.pk}/unread/")
    assert client.delete(f"/api/notifications/{second.pk}/").status_code == 204
    changes = [(t, d["ids"], d.get("read"), d["unread_count"]) for t, d in events_of(bob)[3:]]
    assert changes == [
        ("v1:notification.read", [first.pk], True, 2),
        ("v1:notification.read", [first.pk], False, 3),
        ("v1:notification.read", sorted([first.pk, second.pk, third.pk]), True, 0),
        ("v1:notification.read", [second.pk], False, 1),
        ("v1:notification.deleted", [second.pk], None, 0),
    ]
    assert [n["id"] for n in client.get("/api/notifications/").json()["results"]] == [
        third.pk,
        first.pk,
    ]
    assert Notification.objects.filter(pk=second.pk, deleted_at__isnull=False).exists()


@pytest.mark.django_db
def test_list_is_newest_first_paginated_by_cursor_and_filtered():
    bob = UserFactory()
    for i in range(5):
        notify(bob, f"v{i}", level="warning" if i % 2 else "info")
    set_read(bob, Notification.objects.filter(verb="v0").values_list("pk", flat=True))
    client = client_for(bob)
    page = client.get("/api/notifications/", {"page_size": 2}).json()
    assert [n["verb"] for n in page["results"]] == ["v4", "v3"]
    page = client.get(page["next"]).json()
    assert [n["verb"] for n in page["results"]] == ["v2", "v1"]
    assert [
        n["verb"] for n in client.get("/api/notifications/?unread=false").json()["results"]
    ] == ["v0"]
    assert [
        n["verb"] for n in client.get("/api/notifications/?level=warning").json()["results"]
    ] == ["v3", "v1"]
    for bad in ("unread=maybe", "level=loud", "page_size=0", "page_size=x", "page_size=101"):
        response = client.get(f"/api/notifications/?{bad}")
        assert response.status_code == 400, bad
        assert bad.split("=")[0] in response.json()


@pytest.mark.django_db
def test_list_etag_gives_304_until_anything_changes_including_a_muted_notification():
    bob = UserFactory()
    notify(bob, "liked")
    client = client_for(bob)
    first = client.get("/api/notifications/")
    etag = first["ETag"]
    assert first["Cache-Control"] == "private, no-cache"
    assert client.get("/api/notifications/", HTTP_IF_NONE_MATCH=etag).status_code == 304
    Preference.objects.create(user=bob, muted_verbs=["muted"])
    notify(bob, "muted")  # no event, but the list changed
    second = client.get("/api/notifications/", HTTP_IF_NONE_MATCH=etag)
    assert second.status_code == 200
    etag = second["ETag"]
    client.post("/api/notifications/read-all/")
    assert client.get("/api/notifications/", HTTP_IF_NONE_MATCH=etag).status_code == 200
    count = client.get("/api/notifications/unread-count/")
    assert count.json() == {"unread_count": 0}
    assert (
        client.get("/api/notifications/unread-count/", HTTP_IF_NONE_MATCH=count["ETag"]).status_code
        == 304
    )
    # Another user never gets a 304 for bob's ETag.
    assert (
        client_for(UserFactory()).get("/api/notifications/", HTTP_IF_NONE_MATCH=etag).status_code
        == 200
    )


@pytest.mark.django_db
def test_bad_paging_parameters_are_refused_even_with_a_matching_etag():
    bob = UserFactory()
    notify(bob, "liked")
    client = client_for(bob)
    for query, status in (("?page_size=null", 400), ("?page_size=0", 400), ("?cursor=junk", 404)):
        response = client.get(f"/api/notifications/{query}", HTTP_IF_NONE_MATCH="*")
        assert response.status_code == status, (query, response.status_code)


@pytest.mark.django_db
def test_delete_takes_if_match():
    bob = UserFactory()
    (note,) = notify(bob, "liked")
    client = client_for(bob)
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    client.post(f"/api/notifications/{note.pk}/read/")
    assert client.delete(f"/api/notifications/{note.pk}/", HTTP_IF_MATCH=etag).status_code == 412
    assert Notification.objects.get(pk=note.pk).deleted_at is None


@pytest.mark.django_db
def test_a_fresh_tag_allows_a_write_when_the_users_stream_has_no_row_yet():
    """A notification made without notify() (an import, a fixture): the user's stream has no
    row, and the write's lock makes one (with an epoch) before it checks If-Match. The tag
    read before names a stream with no events either way, so the write is allowed."""
    from realtime.models import Stream

    bob = UserFactory()
    note = Notification.objects.create(recipient=bob, verb="imported", created_at=timezone.now())
    assert not Stream.objects.filter(name=f"user:{bob.pk}").exists()
    client = client_for(bob)
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    assert client.post(f"/api/notifications/{note.pk}/read/", HTTP_IF_MATCH=etag).status_code == 200
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    assert client.delete(f"/api/notifications/{note.pk}/", HTTP_IF_MATCH=etag).status_code == 204


@pytest.mark.django_db
def test_read_unread_and_the_count_take_preconditions():
    bob = UserFactory()
    (note,) = notify(bob, "liked")
    client = client_for(bob)
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    count_etag = client.get("/api/notifications/unread-count/")["ETag"]
    assert client.post(f"/api/notifications/{note.pk}/read/", HTTP_IF_MATCH=etag).status_code == 200
    # Read since: the tag is stale, so marking it unread on its strength is refused.
    stale = client.post(f"/api/notifications/{note.pk}/unread/", HTTP_IF_MATCH=etag)
    assert stale.status_code == 412
    assert Notification.objects.get(pk=note.pk).read_at is not None
    fresh = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    none_match = client.post(f"/api/notifications/{note.pk}/unread/", HTTP_IF_NONE_MATCH=fresh)
    assert none_match.status_code == 412
    count = client.get("/api/notifications/unread-count/", HTTP_IF_MATCH=count_etag)
    assert count.status_code == 412


@pytest.mark.django_db
def test_preferences_round_trip_and_validate():
    bob = UserFactory()
    client = client_for(bob)
    assert client.get("/api/notifications/preferences/").json() == {
        "muted_verbs": [],
        "muted_levels": [],
    }
    body = {"muted_verbs": ["liked"], "muted_levels": ["info"]}
    response = client.put("/api/notifications/preferences/", body, content_type="application/json")
    assert response.json() == body
    bad = client.put(
        "/api/notifications/preferences/",
        {"muted_levels": ["loud"]},
        content_type="application/json",
    )
    assert bad.status_code == 400
    assert Preference.objects.get(user=bob).muted_levels == ["info"]


# -- live: WebSocket and SSE ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_live_on_the_websocket_replay_after_reconnect_and_others_refused():
    alice, bob = await db(UserFactory)(), await db(UserFactory)()
    bob_socket = RealtimeClient(session_key=await db(session_for)(bob))
    await bob_socket.connect()
    reply = await bob_socket.subscribe(f"user:{bob.pk}")
    assert reply["ok"] is True
    await db(notify)(bob, "liked", actor=alice)
    event = await bob_socket.receive_until("event")
    assert (event["type"], event["data"]["verb"], event["data"]["unread_count"]) == (
        "v1:notification.created",
        "liked",
        1,
    )
    seen = event["seq"]
    await bob_socket.close()

    await db(notify)(bob, "followed", actor=alice)
    await db(notify)(bob, "mentioned you in", actor=alice)
    again = RealtimeClient(session_key=await db(session_for)(bob))
    await again.connect()
    reply = await again.subscribe(f"user:{bob.pk}", since=seen, epoch=reply["data"]["epoch"])
    assert reply["data"]["recovered"] is True
    replayed = [await again.receive_until("event") for _ in range(2)]
    assert [e["data"]["verb"] for e in replayed] == ["followed", "mentioned you in"]
    assert [e["seq"] for e in replayed] == [seen + 1, seen + 2]
    await again.close()

    snoop = RealtimeClient(session_key=await db(session_for)(alice))
    await snoop.connect()
    refused = await snoop.subscribe(f"user:{bob.pk}")
    assert refused["ok"] is False
    assert refused["error"]["code"] == "forbidden"
    await snoop.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_live_on_sse_and_read_state_follows():
    bob = await db(UserFactory)()
    reader, _ = await open_sse(bob, f"user:{bob.pk}")
    (note,) = await db(notify)(bob, "liked")
    created = await reader.event()
    assert created["event"] == "v1:notification.created"
    assert created["data"]["data"]["id"] == note.pk
    await db(set_read)(bob, [note.pk])
    read = await reader.event()
    assert read["event"] == "v1:notification.read"
    assert read["data"]["data"]["unread_count"] == 0
    await reader.close()

    client = Client()
    await db(client.force_login)(await db(UserFactory)())
    refused = await db(client.get)("/realtime/sse/", {"streams": f"user:{bob.pk}"})
    assert refused.status_code == 403


# -- admin, template tag, checks --------------------------------------------------------------


@pytest.mark.django_db
def test_admin_lists_searches_and_bulk_marks_read_with_events():
    staff = UserFactory(is_staff=True, is_superuser=True)
    bob, carol = UserFactory(username="bob-admin"), UserFactory(username="carol-admin")
    notify([bob, carol], "announced")
    client = client_for(staff)
    page = client.get("/admin/notifications/notification/", {"q": "bob-admin"})
    assert page.status_code == 200
    assert page.context["cl"].result_count == 1
    ids = list(Notification.objects.values_list("pk", flat=True))
    response = client.post(
        "/admin/notifications/notification/",
        {"action": "mark_read", "_selected_action": ids},
        follow=True,
    )
    assert "2 notification(s) marked read." in response.content.decode()
    for user in (bob, carol):
        assert [t for t, _d in events_of(user)] == [
            "v1:notification.created",
            "v1:notification.read",
        ]
    assert client.get("/admin/notifications/notification/add/").status_code == 403


@pytest.mark.django_db
def test_template_tags_render_the_count_and_the_bell():
    bob = UserFactory()
    notify(bob, "liked")
    notify(bob, "followed")
    request = RequestFactory().get("/")
    request.user = bob
    html = Template(
        "{% load notifications_tags %}[{% unread_notifications_count %}]{% notification_bell %}"
    ).render(Context({"request": request}))
    assert html.startswith("[2]")
    assert f'data-stream="user:{bob.pk}"' in html
    assert re.search(r"data-unread-count[^>]*>2<", html)
    from django.contrib.auth.models import AnonymousUser

    request.user = AnonymousUser()
    html = Template(
        "{% load notifications_tags %}[{% unread_notifications_count %}]{% notification_bell %}"
    ).render(Context({"request": request}))
    assert html.strip() == "[0]"


@pytest.mark.django_db
def test_demo_home_page_shows_the_bell_and_the_list():
    bob = UserFactory()
    notify(bob, "welcomed you to", data={})
    page = client_for(bob).get("/").content.decode()
    assert "notification-bell" in page
    assert "welcomed you to" in page


def test_system_check_errors_without_a_user_stream_policy():
    from notifications.checks import check_user_stream

    assert check_user_stream() == []
    previous = stream_kinds.get("user")
    stream_kinds.unregister("user")
    try:
        assert [m.id for m in check_user_stream()] == ["notifications.E001"]
        stream_kinds.register("user", type("Loose", (UserPolicy.__mro__[1],), {}))
        messages = check_user_stream()
        assert [m.id for m in messages] == ["notifications.W001"]
        assert all(isinstance(m, checks.CheckMessage) for m in messages)
    finally:
        stream_kinds.register("user", previous)


def _hold_the_stream_with_an_unread_row(user: Any, holding: Any, release: Any) -> None:
    """Another writer: a notification of `user` made, its stream locked, not yet committed."""
    from realtime.log import lock_streams

    try:
        with transaction.atomic():
            lock_streams([f"user:{user.pk}"])
            Notification.objects.create(
                recipient=user, verb="also happened", created_at=timezone.now()
            )
            holding.set()
            release.wait(10)
    finally:
        connection.close()


@pytest.mark.parametrize("change", ["notify", "read all"])
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_count_carried_by_an_event_counts_a_concurrent_writers_notification(change):
    """PostgreSQL, READ COMMITTED: the count is read after the stream lock, so a writer that
    held it (and committed) is counted; read before the lock, it was missed for good."""
    import threading
    import time

    user = UserFactory()
    if change == "read all":
        notify([user], "was read")
    flush()
    holding, release = threading.Event(), threading.Event()
    other = threading.Thread(
        target=_hold_the_stream_with_an_unread_row, args=(user, holding, release)
    )
    other.start()
    assert holding.wait(10)

    def write() -> None:
        try:
            if change == "notify":
                notify([user], "happened")
            else:
                read_all(user)
        finally:
            connection.close()

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5)  # the writer has made its change and waits for the stream
    release.set()
    other.join(10)
    writer.join(10)
    flush()
    last = Event.objects.filter(stream__name=f"user:{user.pk}").order_by("-seq").first()
    assert last is not None
    true_count = Notification.objects.unread().filter(recipient=user).count()
    # A read-all takes the stream first, then marks: the other writer's notification, committed
    # before it, is before the read event in the stream, and is read too ("all").
    assert true_count == (2 if change == "notify" else 0)
    assert last.data["unread_count"] == true_count


# -- bad input, bounds and races ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "position",
    [
        b"p=junk",
        b"p=2026-13-45T99:00:00",
        b"o=5&p=x",
        # Valid times that leave Python's range in UTC (SQLite converts there: OverflowError).
        b"p=9999-12-31T23%3A59%3A59-01%3A00",
        b"p=0001-01-01T00%3A00%3A00%2B01%3A00",
    ],
)
def test_a_forged_cursor_position_is_a_404_not_a_500(position):
    import base64

    bob = UserFactory()
    notify(bob, "liked")
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    cursor = base64.b64encode(position).decode()
    assert client.get("/api/notifications/", {"cursor": cursor}).status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("size", ["\u00b2", "\u0663", "1" * 40, " 5", "+5"])
def test_page_sizes_that_are_not_plain_digits_are_a_400(size):
    bob = UserFactory()
    notify(bob, "liked")
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    response = client.get("/api/notifications/", {"page_size": size})
    assert response.status_code == 400
    assert "page_size" in response.json()


@pytest.mark.django_db
def test_every_bad_filter_gets_its_message():
    bob = UserFactory()
    notify(bob, "liked")
    response = client_for(bob).get("/api/notifications/?unread=maybe&level=loud&page_size=0")
    assert response.status_code == 400
    assert set(response.json()) == {"unread", "level", "page_size"}


@pytest.mark.django_db
def test_a_list_page_reads_a_bounded_number_of_rows_whatever_the_user_has():
    bob = UserFactory()
    now = timezone.now()
    Notification.objects.bulk_create(
        (Notification(recipient=bob, verb="x", created_at=now) for _ in range(600)), batch_size=600
    )
    client = client_for(bob)
    with CaptureQueriesContext(connection) as queries:
        first = client.get("/api/notifications/", {"page_size": 1})
    assert first.status_code == 200
    reads = [
        q["sql"].upper() for q in queries if '"NOTIFICATIONS_NOTIFICATION"' in q["sql"].upper()
    ]
    # The page itself (LIMIT 2), and for the ETag one aggregate row, never the user's pks.
    limits = [int(sql.rsplit("LIMIT", 1)[1].split()[0]) for sql in reads if "LIMIT" in sql]
    aggregates = [sql for sql in reads if "LIMIT" not in sql]
    assert limits, reads
    assert max(limits) <= 2, reads
    assert all("COUNT(" in sql and "MAX(" in sql for sql in aggregates), reads
    # A muted notification (no event) still changes the ETag.
    Preference.objects.create(user=bob, muted_verbs=["muted"])
    notify(bob, "muted")
    assert (
        client.get(
            "/api/notifications/", {"page_size": 1}, HTTP_IF_NONE_MATCH=first["ETag"]
        ).status_code
        == 200
    )
    again = client.get("/api/notifications/", {"page_size": 1})
    # So does a notification removed without an event (the admin deletes it).
    Notification.objects.filter(verb="x").first().delete()
    assert (
        client.get(
            "/api/notifications/", {"page_size": 1}, HTTP_IF_NONE_MATCH=again["ETag"]
        ).status_code
        == 200
    )


@pytest.mark.django_db
def test_read_all_is_one_update_and_names_the_ids_only_when_they_are_few(monkeypatch):
    from notifications import service

    monkeypatch.setattr(service, "READ_ALL_IDS", 5)
    bob = UserFactory()
    few = [notify(bob, f"v{i}")[0].pk for i in range(3)]
    client = client_for(bob)
    assert client.post("/api/notifications/read-all/").json() == {
        "ids": sorted(few),
        "count": 3,
        "unread_count": 0,
    }
    now = timezone.now()
    Notification.objects.bulk_create(
        (Notification(recipient=bob, verb="x", created_at=now) for _ in range(40)), batch_size=40
    )
    with CaptureQueriesContext(connection) as queries:
        answer = client.post("/api/notifications/read-all/").json()
    assert answer == {"count": 40, "unread_count": 0}
    assert not Notification.objects.filter(recipient=bob, read_at__isnull=True).exists()
    # No statement lists the 40 ids (an IN of every unread id failed past SQLite's limit).
    assert all(sql.count("%s") < 40 and sql.count("?") < 40 for sql in (q["sql"] for q in queries))
    _type, last = events_of(bob)[-1]
    assert last == {"all": True, "count": 40, "read": True, "unread_count": 0}
    _type, before = events_of(bob)[-2]
    assert before == {"all": True, "ids": sorted(few), "count": 3, "read": True, "unread_count": 0}


@pytest.mark.django_db
def test_recipients_must_be_saved_users():
    from board.models import Project

    project = ProjectFactory(owner=UserFactory())
    bystander = UserFactory()
    project.pk = bystander.pk  # a project whose pk is some user's
    with pytest.raises(TypeError, match="not a user"):
        notify(project, "commented on")
    with pytest.raises(TypeError, match="not a user"):
        notify(Project.objects.all(), "commented on")
    with pytest.raises(TypeError, match="not a user"):
        notify([project], "commented on")
    with pytest.raises(TypeError, match="not saved"):
        notify(get_user_model()(username="ghost"), "liked")
    assert not Notification.objects.exists()


@pytest.mark.django_db
def test_a_user_given_as_an_object_and_as_pk_text_is_notified_once():
    bob = UserFactory()
    notify([bob, str(bob.pk), bob.pk], "mentioned you in")
    assert Notification.objects.filter(recipient=bob).count() == 1
    with pytest.raises(TypeError, match="not a valid user pk"):
        notify(["nobody"], "liked")
    with pytest.raises(TypeError, match="not a valid user pk"):
        notify([True], "liked")  # not user 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_bulk_notifies_to_the_same_users_in_other_orders_do_not_deadlock(monkeypatch):
    import contextlib
    import threading

    from notifications import service

    a, b = UserFactory(), UserFactory()
    notify([a, b], "warm up")  # both streams exist
    flush()
    barrier = threading.Barrier(2, timeout=3)
    real_chunk = service._notify_chunk
    seen = threading.local()

    def chunk(*args, **kwargs):
        rows = real_chunk(*args, **kwargs)
        if not getattr(seen, "once", False):  # both writers hold their first batch's locks
            seen.once = True
            # Broken: the other one waits for our locks (the fixed order), so go on.
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return rows

    monkeypatch.setattr(service, "_notify_chunk", chunk)
    errors = []

    def write(order):
        try:
            notify(order, "announced", batch_size=1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(order,)) for order in ([a, b], [b, a])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    flush()
    assert errors == [], [repr(e) for e in errors]
    assert Notification.objects.filter(verb="announced").count() == 4


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_delete_with_if_match_does_not_pass_over_a_change_made_meanwhile(monkeypatch):
    import threading

    import notifications.api as notifications_api

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    flush()
    client = client_for(bob)
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    real_soft_delete = notifications_api.soft_delete
    other = []
    threads = []

    def mark_read_meanwhile():
        try:
            other.append(client_for(bob).post(f"/api/notifications/{note.pk}/read/").status_code)
        finally:
            connection.close()

    def soft_delete(user, ids):
        # The If-Match check passed; another request marks it read before the delete writes.
        thread = threading.Thread(target=mark_read_meanwhile)
        threads.append(thread)
        thread.start()
        thread.join(2)  # it waits for this delete's lock, so it does not finish here
        return real_soft_delete(user, ids)

    monkeypatch.setattr(notifications_api, "soft_delete", soft_delete)
    response = client.delete(f"/api/notifications/{note.pk}/", HTTP_IF_MATCH=etag)
    (thread,) = threads
    thread.join(10)
    assert not thread.is_alive()
    flush()
    note.refresh_from_db()
    assert response.status_code == 204
    assert note.deleted_at is not None
    assert note.read_at is None  # the read came after the delete, and found nothing to mark
    assert other == [404]


# -- review: recipients, races, bounded changes, admin deletes, the bell ----------------------


@pytest.mark.django_db
def test_a_recipient_pk_of_no_user_raises_before_anything_is_written():
    from realtime.models import Stream

    bob = UserFactory()
    missing = bob.pk + 1000
    # Unchecked, the rows and events were written and the foreign key failed at the commit,
    # so the caller's whole transaction failed there, far from the call.
    with pytest.raises(ValueError, match=f"no user has pk {missing}"):
        notify([bob, missing], "liked")
    gone = UserFactory()
    get_user_model().objects.filter(pk=gone.pk).delete()  # the instance keeps its pk
    with pytest.raises(ValueError, match="no user has pk"):
        notify(gone, "liked")
    assert not Notification.objects.exists()
    assert not Stream.objects.filter(name__startswith="user:").exists()
    connection.check_constraints()


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["delete", "read", "unread"])
def test_a_notification_deleted_while_a_write_waits_for_its_lock_is_a_404_not_a_500(
    monkeypatch, method
):
    from django.db.models import QuerySet

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    etag = client.get(f"/api/notifications/{note.pk}/")["ETag"]
    real = QuerySet.select_for_update

    def select_for_update(self, *args, **kwargs):
        if self.model is Notification:  # another request's delete commits before our lock
            Notification.objects.filter(pk=note.pk).update(deleted_at=timezone.now())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QuerySet, "select_for_update", select_for_update)
    url = f"/api/notifications/{note.pk}/"
    if method == "delete":
        response = client.delete(url, HTTP_IF_MATCH=etag)
    else:
        response = client.post(f"{url}{method}/", HTTP_IF_MATCH=etag)
    assert response.status_code == 404


@pytest.mark.django_db(transaction=True)
def test_a_read_answers_the_notification_it_marked_even_if_deleted_right_after(monkeypatch):
    import notifications.api as notifications_api

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    real_set_read = notifications_api.set_read

    def set_read_then_deleted(user, ids, read=True):
        changed = real_set_read(user, ids, read=read)
        # Another tab deletes it as soon as this read commits.
        transaction.on_commit(
            lambda: Notification.objects.filter(pk=note.pk).update(deleted_at=timezone.now())
        )
        return changed

    monkeypatch.setattr(notifications_api, "set_read", set_read_then_deleted)
    response = client_for(bob).post(f"/api/notifications/{note.pk}/read/")
    flush()
    # The read was made (and its event sent): the answer is the notification, not a 404.
    assert response.status_code == 200
    assert response.json()["id"] == note.pk
    assert response.json()["unread"] is False
    assert [t for t, _d in events_of(bob)] == ["v1:notification.created", "v1:notification.read"]


@pytest.mark.django_db
def test_marking_many_notifications_at_once_sends_events_of_bounded_size(monkeypatch):
    from notifications import service

    monkeypatch.setattr(service, "IDS_PER_EVENT", 5)
    bob = UserFactory()
    now = timezone.now()
    Notification.objects.bulk_create(
        Notification(recipient=bob, verb="x", created_at=now) for _ in range(12)
    )
    ids = sorted(Notification.objects.values_list("pk", flat=True))
    sizes: list[int] = []

    def count_params(execute, sql, params, many, context):
        sizes.append(len(params or ()))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count_params):
        assert sorted(set_read(bob, ids)) == ids
    # No statement lists all 12 ids, and no event carries more than 5.
    assert max(sizes) < 12
    changes = [(d["ids"], d["unread_count"]) for _t, d in events_of(bob)]
    assert changes == [(ids[:5], 7), (ids[5:10], 2), (ids[10:], 0)]
    assert sorted(service.soft_delete(bob, ids)) == ids
    assert [len(d["ids"]) for t, d in events_of(bob) if t.endswith("deleted")] == [5, 5, 2]
    assert not Notification.objects.for_user(bob).exists()


@pytest.mark.django_db
def test_an_admin_delete_tells_the_recipient_with_the_new_count():
    staff = UserFactory(is_staff=True, is_superuser=True)
    bob = UserFactory()
    first, second, third = (notify(bob, f"v{i}")[0] for i in range(3))
    client = client_for(staff)
    response = client.post(
        "/admin/notifications/notification/",
        {"action": "delete_selected", "_selected_action": [first.pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert not Notification.objects.filter(pk=first.pk).exists()
    # Every tab of bob showed it, and a count of 3: both follow from the event.
    assert events_of(bob)[-1] == (
        "v1:notification.deleted",
        {"ids": [first.pk], "unread_count": 2},
    )
    response = client.post(
        f"/admin/notifications/notification/{second.pk}/delete/", {"post": "yes"}
    )
    assert response.status_code == 302
    assert events_of(bob)[-1] == (
        "v1:notification.deleted",
        {"ids": [second.pk], "unread_count": 1},
    )
    # One bob deleted already is gone from his tabs: removing it for good sends nothing.
    client_for(bob).delete(f"/api/notifications/{third.pk}/")
    before = len(events_of(bob))
    client.post(
        "/admin/notifications/notification/",
        {"action": "delete_selected", "_selected_action": [third.pk], "post": "yes"},
    )
    assert not Notification.objects.exists()
    assert len(events_of(bob)) == before


@pytest.mark.django_db
def test_admin_search_follows_the_user_models_own_fields(monkeypatch):
    from django.contrib import admin as django_admin

    from notifications.admin import NotificationAdmin, PreferenceAdmin

    user_model = get_user_model()
    # A custom user model logs in by another field (and may have no `username` at all).
    monkeypatch.setattr(user_model, "USERNAME_FIELD", "first_name")
    request = RequestFactory().get("/admin/")
    notification_admin = NotificationAdmin(Notification, django_admin.site)
    fields = list(notification_admin.get_search_fields(request))
    assert "recipient__first_name" in fields
    assert "recipient__username" not in fields
    assert "recipient__email" in fields  # get_email_field_name()
    preference_admin = PreferenceAdmin(Preference, django_admin.site)
    assert list(preference_admin.get_search_fields(request)) == ["user__first_name", "user__email"]
    # The live connections' admin too.
    from realtime.admin import ConnectionAdmin
    from realtime.models import Connection

    connections = list(ConnectionAdmin(Connection, django_admin.site).get_search_fields(request))
    assert connections[:2] == ["user__first_name", "user__email"]
    assert "user__username" not in connections


def _bell_urls(monkeypatch: Any, prefix: str) -> str:
    """A URLconf module that mounts the notifications under `prefix`; its dotted name."""
    import sys
    import types

    from django.urls import include, path

    module = types.ModuleType("notification_bell_urls")
    module.urlpatterns = [path(prefix, include("notifications.urls"))]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


@pytest.mark.django_db
def test_the_bell_calls_the_api_where_the_project_mounted_it(monkeypatch):
    from django.test import override_settings

    bob = UserFactory()
    request = RequestFactory().get("/")
    request.user = bob
    with override_settings(ROOT_URLCONF=_bell_urls(monkeypatch, "inbox/")):
        html = Template("{% load notifications_tags %}{% notification_bell %}").render(
            Context({"request": request})
        )
    assert 'data-list-url="/inbox/api/notifications/"' in html
    assert 'data-count-url="/inbox/api/notifications/unread-count/"' in html
    assert 'data-read-all-url="/inbox/api/notifications/read-all/"' in html
    assert '"/api/notifications/' not in html


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_bells_on_a_page_open_and_follow_the_stream_once(browser, server):
    from playwright.sync_api import expect

    bob = UserFactory()
    request = RequestFactory().get("/")
    request.user = bob
    bells = Template(
        "{% load notifications_tags %}<header>{% notification_bell %}</header>"
        "<footer>{% notification_bell %}</footer>"
    ).render(Context({"request": request}))
    html = (
        "<!doctype html><html><body><span data-realtime-status></span>"
        "<script>window.seen = 0; document.addEventListener('notification', () => seen++);"
        f"</script>{bells}</body></html>"
    )
    context = browser.new_context(base_url=server.url(""))
    # The page below comes from the route, not the server: Chromium would keep it off 127.0.0.1.
    context.grant_permissions(["local-network-access"])
    context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session_for(bob), "url": server.url("/")}]
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.route(
        server.url("/two-bells/"), lambda route: route.fulfill(body=html, content_type="text/html")
    )
    # Made after the render: the bells' subscription replays it (the test's process publishes
    # to no channel layer daphne reads).
    notify(bob, "mentioned you")
    page.goto("/two-bells/")
    expect(page.locator("[data-realtime-status]")).to_have_attribute("data-status", "open")
    for bell in ("header", "footer"):
        expect(page.locator(f"{bell} [data-unread-count]")).to_have_text("1")
    top = page.locator("header .notification-bell")
    top.locator(".notification-bell__button").click()
    # Each bell's script handled every bell: a click toggled the menu twice (it stayed shut).
    expect(top.locator(".notification-bell__menu")).to_be_visible()
    expect(top.locator("[data-notification-list] li")).to_have_text(["someone mentioned you"])
    page.wait_for_timeout(300)  # another subscription's copy of the event would be here by now
    assert page.evaluate("window.seen") == 1
    context.close()


@pytest.mark.django_db
def test_an_id_past_the_columns_range_is_a_404_on_every_route():
    bob = UserFactory()
    notify(bob, "liked")
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    url = f"/api/notifications/{'9' * 25}/"
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404
    assert client.post(f"{url}read/").status_code == 404
    assert client.post(f"{url}unread/").status_code == 404


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["hidden", "deleted"])
def test_a_notification_gone_between_its_permission_check_and_its_read_is_a_404(monkeypatch, how):
    from notifications.service import soft_delete
    from realtime import conditional

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    real = conditional.stream_positions

    def positions_then_gone(streams):
        # Runs after get_object() found the row and before the data is read again.
        if how == "hidden":
            soft_delete(bob, [note.pk])
        else:
            Notification.objects.filter(pk=note.pk).delete()
        return real(streams)

    monkeypatch.setattr(conditional, "stream_positions", positions_then_gone)
    client = Client(raise_request_exception=False)
    client.force_login(bob)
    response = client.get(f"/api/notifications/{note.pk}/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


@pytest.mark.django_db
def test_data_with_dates_decimals_and_uuids_is_stored_as_its_event_carries_it():
    import datetime as dt
    import decimal
    import uuid

    bob = UserFactory()
    ref = uuid.uuid4()
    at = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    # Checked with the events' encoder, it was stored with plain json: a TypeError at INSERT.
    (note,) = notify(bob, "billed", data={"at": at, "amount": decimal.Decimal("1.50"), "ref": ref})
    expected = {"at": "2026-12-04T12:00:00Z", "amount": "1.50", "ref": str(ref)}
    assert Notification.objects.get(pk=note.pk).data == expected
    event = Event.objects.filter(stream__name=f"user:{bob.pk}").latest("seq")
    assert (event.type, event.data["data"]) == ("v1:notification.created", expected)
    client = Client()
    client.force_login(bob)
    assert client.get(f"/api/notifications/{note.pk}/").json()["data"] == expected


@pytest.mark.parametrize(
    "change", ["set_read", "soft_delete", "delete_by_admin", "mark_read_by_admin"]
)
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_change_racing_a_read_all_locks_the_stream_before_the_rows(monkeypatch, change):
    """The change has written its rows and is about to emit; a read-all starts and has to wait.
    It used to hold the rows and then ask for the stream, which the read-all held while it
    waited for the rows: PostgreSQL aborted one of them. The stream is taken first now."""
    import threading
    import time

    from notifications import service

    from .test_api_concurrency import someone_waits_on_me

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    notify(bob, "commented")
    flush()
    real_changed = service._changed
    threads: list[threading.Thread] = []
    outcome: list[Any] = []

    def read_all_meanwhile() -> None:
        try:
            outcome.append(read_all(bob)["count"])
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connection.close()

    def changed(*args, **kwargs):
        if not threads:
            threads.append(threading.Thread(target=read_all_meanwhile))
            threads[0].start()
            deadline = time.monotonic() + 10
            while not someone_waits_on_me():
                assert time.monotonic() < deadline, "the read-all never waited for the change"
                time.sleep(0.02)
        return real_changed(*args, **kwargs)

    monkeypatch.setattr(service, "_changed", changed)
    selected = Notification.objects.filter(pk=note.pk)
    {
        "set_read": lambda: service.set_read(bob, [note.pk]),
        "soft_delete": lambda: service.soft_delete(bob, [note.pk]),
        "delete_by_admin": lambda: service.delete_by_admin(selected),
        "mark_read_by_admin": lambda: service.mark_read_by_admin(selected),
    }[change]()
    (thread,) = threads
    thread.join(30)
    flush()
    assert outcome == [1]  # the other one, after the change committed
    assert not Notification.objects.unread().filter(recipient=bob).exists()
