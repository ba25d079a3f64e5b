"""The WebSocket endpoint through Channels' communicator: handshake, protocol, resume, authz."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction

from board.membership import add_member, remove_member
from board.models import Item
from realtime.models import Connection, Event
from realtime.testing import RealtimeClient, session_for

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

db = sync_to_async


async def client_for(user=None, **kwargs) -> RealtimeClient:
    session = await db(session_for)(user) if user is not None else None
    client = RealtimeClient(session_key=session, **kwargs)
    await client.connect()
    return client


async def make_project():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    return owner, project


# -- handshake ----------------------------------------------------------------------------


async def test_session_user_gets_welcome_and_a_connection_row():
    owner, _ = await make_project()
    client = await client_for(owner)
    welcome = client.welcome
    assert welcome["op"] == "welcome"
    assert welcome["protocol"] == "v1"
    assert welcome["heartbeat"] == 25.0
    assert len(welcome["connectionId"]) == 32
    row = await db(Connection.objects.get)(pk=welcome["connectionId"])
    assert (row.user_id, row.transport) == (owner.pk, "websocket")
    assert row.tenant == ""  # the owner belongs to no organization
    assert row.subscriptions == []
    await client.close()
    assert not await db(Connection.objects.filter(pk=welcome["connectionId"]).exists)()


async def test_anonymous_socket_is_closed_with_4401():
    client = RealtimeClient()
    assert await client.connect() == {"type": "websocket.close", "code": 4401}


async def test_foreign_origin_is_closed_with_4403(caplog):
    owner, _ = await make_project()
    session = await db(session_for)(owner)
    client = RealtimeClient(session_key=session, origin="https://evil.example")
    assert await client.connect() == {"type": "websocket.close", "code": 4403}
    assert "origin not allowed" in caplog.text
    assert "evil.example" in caplog.text


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "http://x]"])
async def test_a_malformed_origin_is_closed_with_4403(origin):
    owner, _ = await make_project()
    client = RealtimeClient(session_key=await db(session_for)(owner), origin=origin)
    assert await client.connect() == {"type": "websocket.close", "code": 4403}


async def test_an_empty_ticket_does_not_fall_back_to_the_cookie():
    owner, _ = await make_project()
    session = await db(session_for)(owner)
    client = RealtimeClient(session_key=session, path="/ws/realtime/?ticket=")
    assert await client.connect() == {"type": "websocket.close", "code": 4401}


async def test_a_socket_refused_for_the_connection_limit_handles_no_frame(settings):
    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": 1}
    owner, project = await make_project()
    other = await db(UserFactory)()
    await db(add_member)(project, other)
    stream = f"project:{project.pk}"
    watcher = await client_for(other)
    await watcher.subscribe(stream)
    first = await client_for(owner)
    refused = RealtimeClient(session_key=await db(session_for)(owner))
    assert (await refused.connect())["code"] == 4429
    # Frames the client sends while the close handshake runs are not handled.
    await refused.send({"op": "publish", "stream": stream, "type": "v1:typing.started", "data": {}})
    assert await watcher.nothing_more(0.5)
    await first.close()
    await watcher.close()


async def logged_out_while_its_row_is_written(monkeypatch) -> RealtimeClient:
    """A client whose user logs out during its handshake, before the socket watches the
    user's group (so the logout's message reaches no socket)."""
    from django.conf import settings as django_settings
    from django.test import Client

    from realtime.consumers import RealtimeConsumer
    from realtime.testing import flush

    session = await db(session_for)(await db(UserFactory)())
    original = RealtimeConsumer._open_row

    def open_row_then_logout(self, *args):
        opened = original(self, *args)
        browser = Client()
        browser.cookies[django_settings.SESSION_COOKIE_NAME] = session
        browser.logout()
        flush()
        return opened

    monkeypatch.setattr(RealtimeConsumer, "_open_row", open_row_then_logout)
    return RealtimeClient(session_key=session)


async def test_a_logout_during_the_handshake_closes_the_socket(monkeypatch):
    """The logout's message went to the user's group before this socket watched it."""
    client = await logged_out_while_its_row_is_written(monkeypatch)
    connected, _ = await client.communicator.connect()
    assert connected  # accepted, then closed: it reconnects and the handshake refuses it
    assert await client.receive(timeout=3) == {"type": "websocket.close", "code": 4000}


async def test_missing_origin_is_refused():
    owner, _ = await make_project()
    client = RealtimeClient(session_key=await db(session_for)(owner), origin=None)
    assert (await client.connect())["code"] == 4403


async def test_ticket_is_single_use_and_never_logged(client, caplog):
    owner, project = await make_project()
    await db(client.force_login)(owner)
    response = await db(client.post)("/api/realtime/tickets/")
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    ticket = response.json()["ticket"]
    assert response.json()["expiresIn"] == 60

    first = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}")
    assert (await first.connect())["op"] == "welcome"
    reply = await first.subscribe(f"project:{project.pk}")
    assert reply["ok"] is True
    again = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}")
    assert (await again.connect())["code"] == 4401
    await first.close()
    assert ticket not in caplog.text


async def test_tickets_need_authentication(client):
    assert (await db(client.post)("/api/realtime/tickets/")).status_code == 403


async def test_expired_or_forged_ticket_is_refused(settings):
    owner, _ = await make_project()
    from realtime.tickets import issue

    ticket = await db(issue)(owner)
    forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    assert (await RealtimeClient(path=f"/ws/realtime/?ticket={forged}").connect())["code"] == 4401
    settings.REALTIME = {"TICKET_TTL": -1}
    assert (await RealtimeClient(path=f"/ws/realtime/?ticket={ticket}").connect())["code"] == 4401


async def test_connections_per_user_are_limited(settings):
    settings.REALTIME = {"MAX_CONNECTIONS_PER_USER": 2}
    owner, _ = await make_project()
    a, b = await client_for(owner), await client_for(owner)
    third = RealtimeClient(session_key=await db(session_for)(owner))
    assert (await third.connect())["code"] == 4429
    await a.close()
    await b.close()


async def test_rows_of_a_dead_node_do_not_count_against_the_limit(settings):
    """A node died holding the user's sockets: its rows stay until swept, and the node that
    sweeps may be one with no socket yet (it would then never sweep): the limit counts only
    rows a live node touched within CONNECTION_SWEEP_AFTER."""
    from django.utils import timezone

    from realtime.models import Connection

    settings.REALTIME = {"MAX_CONNECTIONS_PER_USER": 2}
    owner, _ = await make_project()
    silent = timezone.now() - dt.timedelta(seconds=91)  # past CONNECTION_SWEEP_AFTER (90 s)
    for n in range(2):
        await db(Connection.objects.create)(
            id=f"dead-{n}", user=owner, node="dead-node", transport="websocket", last_seen=silent
        )
    client = RealtimeClient(session_key=await db(session_for)(owner))
    assert (await client.connect())["op"] == "welcome"
    await client.close()


# -- subscribe, events, resume ------------------------------------------------------------


async def test_subscriber_receives_committed_events_in_order():
    owner, project = await make_project()
    client = await client_for(owner)
    reply = await client.subscribe(f"project:{project.pk}")
    assert reply["ok"] is True
    assert reply["data"]["recovered"] is False
    assert reply["data"]["seq"] == 1
    start = reply["data"]["seq"]

    def save_three():
        with transaction.atomic():
            for n in range(3):
                Item.objects.create(project=project, title=f"t{n}")

    await db(save_three)()
    frames = [await client.receive_until("event") for _ in range(3)]
    assert [f["seq"] for f in frames] == [start + 1, start + 2, start + 3]
    assert [f["data"]["title"] for f in frames] == ["t0", "t1", "t2"]
    assert all(
        f["type"] == "v1:item.created" and f["stream"] == f"project:{project.pk}" for f in frames
    )
    await client.close()


async def test_resume_since_replays_missed_events_then_continues_live():
    owner, project = await make_project()
    for n in range(5):
        await db(ItemFactory)(project=project, title=f"missed {n}")
    events = await db(list)(
        Event.objects.filter(stream__name=f"project:{project.pk}")
        .select_related("stream")
        .order_by("seq")
    )
    epoch = events[0].stream.epoch
    client = await client_for(owner)
    # The epoch the client last saw: the same log, so the history since 2 is recovered.
    reply = await client.subscribe(f"project:{project.pk}", since=2, epoch=epoch)
    assert reply["data"]["recovered"] is True
    assert reply["data"]["seq"] == 6
    assert reply["data"]["epoch"] == epoch
    replayed = [await client.receive_until("event") for _ in range(4)]
    assert [f["seq"] for f in replayed] == [3, 4, 5, 6]
    assert [f["eventId"] for f in replayed] == [str(e.event_id) for e in events[2:]]
    await db(ItemFactory)(project=project, title="live")
    live = await client.receive_until("event")
    assert live["seq"] == 7
    assert live["data"]["title"] == "live"
    assert await client.nothing_more()
    await client.close()


async def test_resume_with_other_epoch_or_pruned_history_is_not_recovered():
    owner, project = await make_project()
    for _ in range(3):
        await db(ItemFactory)(project=project)
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    reply = await client.subscribe(stream, since=1, epoch="not-the-epoch")
    assert reply["data"]["recovered"] is False
    assert reply["data"]["seq"] == 4
    assert await client.nothing_more()  # nothing replayed
    await client.request("unsubscribe", stream=stream)
    await db(Event.objects.filter(stream__name=stream, seq__lte=2).delete)()
    reply = await client.subscribe(stream, since=1, epoch=reply["data"]["epoch"])
    assert reply["data"]["recovered"] is False
    reply2 = await client.request("unsubscribe", stream=stream)
    assert reply2["ok"]
    reply = await client.subscribe(stream, since=2)
    assert reply["data"]["recovered"] is True
    assert [(await client.receive_until("event"))["seq"] for _ in range(2)] == [3, 4]
    await client.close()


async def test_version_is_chosen_per_subscription():
    import realtime

    owner, project = await make_project()
    realtime.register(
        Item,
        streams="project:{project_id}",
        version="v2",
        serializer=lambda i: {"id": i.pk, "label": i.title},
    )
    try:
        v1, v2 = await client_for(owner), await client_for(owner)
        await v1.subscribe(f"project:{project.pk}")
        await v2.subscribe(f"project:{project.pk}", version="v2")
        await db(ItemFactory)(project=project, title="both")
        a, b = await v1.receive_until("event"), await v2.receive_until("event")
    finally:
        realtime.registry.registry.unregister(Item, version="v2")
    assert a["type"] == "v1:item.created"
    assert a["data"]["title"] == "both"
    assert b["type"] == "v2:item.created"
    assert b["data"] == {"id": a["data"]["id"], "label": "both"}
    assert a["seq"] == b["seq"]
    assert a["eventId"] == b["eventId"]
    await v1.close()
    await v2.close()


# -- authorization ------------------------------------------------------------------------


async def test_refused_and_missing_look_the_same_and_unknown_kinds_are_named():
    owner, project = await make_project()
    stranger = await db(UserFactory)()
    client = await client_for(stranger)
    refused = await client.subscribe(f"project:{project.pk}")
    missing = await client.subscribe("project:987654")
    assert refused["ok"] is False
    assert missing["ok"] is False
    assert refused["error"] == missing["error"] == {"code": "forbidden", "message": "not allowed"}
    assert (await client.subscribe("nope:1"))["error"]["code"] == "unknown_stream"
    assert (await client.subscribe(f"user:{owner.pk}"))["error"]["code"] == "forbidden"
    assert (await client.subscribe(f"user:{stranger.pk}"))["ok"] is True
    await client.close()


async def test_revoked_member_is_unsubscribed_and_gets_nothing_more():
    _owner, project = await make_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    client = await client_for(member)
    assert (await client.subscribe(f"project:{project.pk}"))["ok"] is True
    await db(ItemFactory)(project=project, title="before")
    assert (await client.receive_until("event"))["data"]["title"] == "before"

    await db(remove_member)(project, member)
    frame = await client.receive_until("unsubscribed", timeout=1.0)
    assert frame == {"op": "unsubscribed", "stream": f"project:{project.pk}", "reason": "forbidden"}
    await db(ItemFactory)(project=project, title="after")
    assert await client.nothing_more(0.5)
    await client.close()


async def reader_through_a_group():
    """A project, and a member who may view it only through a group: (project, member, group)."""
    from django.contrib.auth.models import Group
    from guardian.shortcuts import assign_perm

    _owner, project = await make_project()
    member = await db(UserFactory)()
    group = await db(Group.objects.create)(name="readers")
    await db(member.groups.add)(group)
    await db(assign_perm)("board.view_project", group, project)
    return project, member, group


async def test_group_permission_change_reaches_group_members():
    from guardian.shortcuts import remove_perm

    project, member, group = await reader_through_a_group()
    client = await client_for(member)
    assert (await client.subscribe(f"project:{project.pk}"))["ok"] is True
    await db(remove_perm)("board.view_project", group, project)
    frame = await client.receive_until("unsubscribed", timeout=1.0)
    assert frame["reason"] == "forbidden"
    await client.close()


async def test_deleting_a_group_ends_what_it_granted():
    project, member, group = await reader_through_a_group()
    client = await client_for(member)
    stream = f"project:{project.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    # Django deletes the membership rows before the group's object permissions, and sends
    # no m2m_changed for them.
    await db(group.delete)()
    frame = await client.receive_until("unsubscribed", timeout=3.0)
    assert frame == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    await db(ItemFactory)(project=project, title="after")
    assert await client.nothing_more(0.5)
    await client.close()


async def test_a_demoted_superuser_loses_what_only_that_gave():
    _owner, project = await make_project()
    admin = await db(UserFactory)(is_superuser=True)
    client = await client_for(admin)
    stream = f"project:{project.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    admin.is_superuser = False
    await db(admin.save)()
    frame = await client.receive_until("unsubscribed", timeout=3.0)
    assert frame == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    # The socket now decides as the user is stored, for new subscriptions as well.
    refused = await client.subscribe(stream)
    assert refused["error"]["code"] == "forbidden"
    await client.close()


async def test_deleting_a_group_that_a_policy_reads_ends_the_stream():
    from django.contrib.auth.models import Group

    from realtime.policies import StreamPolicy, stream_kinds

    class TeamPolicy(StreamPolicy):  # `team:<name>`: the members of that group, no guardian row
        def authorize(self, user, key):
            return user.groups.filter(name=key).exists()

    stream_kinds.register("team", TeamPolicy)
    try:
        member = await db(UserFactory)()
        group = await db(Group.objects.create)(name="red")
        await db(member.groups.add)(group)
        client = await client_for(member)
        assert (await client.subscribe("team:red"))["ok"] is True
        await db(group.delete)()  # no m2m_changed, no object permission rows
        frame = await client.receive_until("unsubscribed", timeout=3.0)
        assert frame == {"op": "unsubscribed", "stream": "team:red", "reason": "forbidden"}
        await client.close()
    finally:
        stream_kinds.unregister("team")


async def test_a_user_deactivated_without_signals_is_closed_by_the_periodic_recheck(settings):
    from django.contrib.auth import get_user_model

    settings.REALTIME = {"HEARTBEAT": 1.0, "AUTHZ_RECHECK_INTERVAL": 0.5}
    user = await db(UserFactory)()
    client = await client_for(user)  # no subscription at all
    await db(get_user_model().objects.filter(pk=user.pk).update)(is_active=False)
    while True:
        frame = await client.receive(timeout=5.0)
        if frame.get("op") != "ping":
            break
        await client.send({"op": "pong"})
    assert frame == {"type": "websocket.close", "code": 4401}


async def test_a_login_stamp_decides_nothing_again(monkeypatch):
    from realtime import invalidation

    owner, _ = await make_project()
    sent: list[object] = []
    monkeypatch.setattr(
        invalidation, "permissions_changed", lambda user_ids, **kwargs: sent.append(user_ids)
    )
    owner.last_login = owner.date_joined
    await db(owner.save)(update_fields=["last_login"])
    assert sent == []
    owner.first_name = "Renamed"
    await db(owner.save)()
    assert sent == [[owner.pk]]


async def test_a_deleted_users_sockets_close():
    user = await db(UserFactory)()
    client = await client_for(user)
    await db(user.delete)()
    assert (await client.receive_until("never", timeout=2.0)) == {
        "type": "websocket.close",
        "code": 4401,
    }


async def test_guardian_prefetch_cache_on_the_user_is_not_trusted(monkeypatch):
    from guardian.conf import settings as guardian_settings

    from realtime import invalidation

    monkeypatch.setattr(guardian_settings, "AUTO_PREFETCH", True)
    _owner, project = await make_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    stream = f"project:{project.pk}"
    client = await client_for(member)
    assert (await client.subscribe(stream))["ok"] is True
    typing = {"stream": stream, "type": "v1:typing.started", "data": {}}
    assert (await client.request("publish", **typing))["ok"] is True
    # No invalidation message this time: the next publish must read the permissions anew
    # rather than the cache guardian's prefetch leaves on the socket's user object.
    monkeypatch.setattr(invalidation, "permissions_changed", lambda *a, **k: None)
    await db(remove_member)(project, member)
    assert (await client.request("publish", **typing))["error"]["code"] == "forbidden"
    await client.close()


async def test_a_lost_permission_message_is_made_up_for_by_the_periodic_recheck(
    settings, monkeypatch
):
    from realtime import invalidation

    settings.REALTIME = {"HEARTBEAT": 1.0, "AUTHZ_RECHECK_INTERVAL": 0.5}
    _owner, project = await make_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    client = await client_for(member)
    stream = f"project:{project.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    monkeypatch.setattr(invalidation, "permissions_changed", lambda *a, **k: None)  # lost
    await db(remove_member)(project, member)
    while True:  # answering pings, as a live client does, until the socket decides again
        frame = await client.receive(timeout=5.0)
        if frame.get("op") == "event":
            continue  # the member change itself, sent while the socket still allowed it
        if frame.get("op") != "ping":
            break
        await client.send({"op": "pong"})
    assert frame == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    await client.close()


async def closed_with(socket: RealtimeClient, wait: float = 3.0) -> int | None:
    """The close code the socket gets within `wait` seconds (None if it stays open)."""
    import time

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if await socket.communicator.receive_nothing(0.2):
            continue
        frame = await socket.receive()
        if frame.get("type") == "websocket.close":
            return frame.get("code")
    return None


@pytest.mark.parametrize("how", ["session", "ticket"])
async def test_a_lost_logout_message_is_made_up_for_by_the_next_decision(how, monkeypatch):
    from django.conf import settings
    from django.test import Client

    from realtime import invalidation
    from realtime.consumers import user_group
    from realtime.publisher import publisher
    from realtime.testing import flush
    from realtime.tickets import issue

    bob = await db(UserFactory)()
    key = await db(session_for)(bob)
    if how == "session":
        socket = RealtimeClient(session_key=key)
    else:
        socket = RealtimeClient(path=f"/ws/realtime/?ticket={await db(issue)(bob)}")
    await socket.connect()
    assert (await socket.subscribe(f"user:{bob.pk}"))["ok"] is True
    real_send = invalidation._send

    def lossy(user_ids, message_type):  # the channel layer loses the logout message
        if message_type != "realtime.logout":
            real_send(user_ids, message_type)

    monkeypatch.setattr(invalidation, "_send", lossy)

    def log_out():
        browser = Client()
        browser.cookies[settings.SESSION_COOKIE_NAME] = key
        browser.logout()

    await db(log_out)()
    assert await closed_with(socket, 0.5) is None  # the message was lost
    # What the periodic recheck (AUTHZ_RECHECK_INTERVAL) or any permission change does.
    publisher.send_control(user_group(bob.pk), {"type": "realtime.authz", "user": bob.pk})
    await db(flush)()
    # A session socket reconnects, and the handshake refuses the session that is gone; a
    # ticket socket is told for good.
    assert await closed_with(socket) == (4000 if how == "session" else 4401)
    if how == "session":
        stale = RealtimeClient(session_key=key)
        assert await stale.connect() == {"type": "websocket.close", "code": 4401}


async def test_a_socket_whose_session_expired_is_closed_at_the_next_decision():
    import datetime as dt

    from django.contrib.sessions.models import Session
    from django.utils import timezone

    from realtime.consumers import user_group
    from realtime.publisher import publisher
    from realtime.testing import flush

    bob = await db(UserFactory)()
    socket = await client_for(bob)
    expired = timezone.now() - dt.timedelta(seconds=1)
    await db(lambda: Session.objects.update(expire_date=expired))()  # not yet cleared away
    publisher.send_control(user_group(bob.pk), {"type": "realtime.authz", "user": bob.pk})
    await db(flush)()
    assert await closed_with(socket) == 4000  # it reconnects, and the handshake decides


async def test_a_decision_keeps_a_socket_whose_session_is_still_signed_in():
    from realtime.consumers import user_group
    from realtime.publisher import publisher
    from realtime.testing import flush

    bob = await db(UserFactory)()
    socket = await client_for(bob)
    publisher.send_control(user_group(bob.pk), {"type": "realtime.authz", "user": bob.pk})
    await db(flush)()
    assert await closed_with(socket, 1.0) is None
    await socket.send({"op": "ping", "ref": "p"})
    assert (await socket.receive_until("pong"))["ref"] == "p"
    await socket.close()


async def test_logout_closes_the_users_sockets(client):
    owner, _ = await make_project()
    session = await db(session_for)(owner)
    socket = RealtimeClient(session_key=session)
    await socket.connect()
    await db(client.force_login)(owner)
    assert (await db(client.post)("/accounts/logout/")).status_code == 302
    assert (await socket.receive_until("never", timeout=2.0)) == {
        "type": "websocket.close",
        "code": 4401,
    }


# -- client publish -----------------------------------------------------------------------


async def test_typing_reaches_others_but_not_the_sender_and_is_not_logged():
    owner, project = await make_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    stream = f"project:{project.pk}"
    sender, other = await client_for(owner), await client_for(member)
    await sender.subscribe(stream)
    await other.subscribe(stream)
    reply = await sender.request("publish", stream=stream, type="v1:typing.started", data={"x": 1})
    assert reply["ok"] is True
    event = await other.receive_until("event")
    assert event["type"] == "v1:typing.started"
    assert "seq" not in event
    assert event["from"]["user"] == owner.pk
    assert event["eventId"] == reply["data"]["eventId"]
    assert isinstance(event["correlationId"], str)
    assert event["correlationId"]
    assert await sender.nothing_more()
    assert not await db(Event.objects.filter(type="v1:typing.started").exists)()
    await sender.close()
    await other.close()


async def test_publish_rules_and_rate_limit(settings):
    settings.REALTIME = {"PUBLISH_RATE": 0.001, "PUBLISH_BURST": 3, "ABUSE_LIMIT": 3}
    owner, project = await make_project()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    bad_type = await client.request("publish", stream=stream, type="v1:item.created", data={})
    assert bad_type["error"]["code"] == "event_not_allowed"  # and it took a token
    for _ in range(2):
        ok = await client.request("publish", stream=stream, type="v1:typing.started", data={})
        assert ok["ok"] is True
    limited = await client.request("publish", stream=stream, type="v1:typing.started", data={})
    assert limited["error"]["code"] == "rate_limited"
    # Refusals since the last success: 1 (above), then 3 more pass the abuse limit of 3.
    for _ in range(3):
        await client.send({"op": "publish", "stream": stream, "type": "v1:typing.started"})
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4429}


async def test_publishes_to_an_unknown_kind_are_rate_limited_and_end_in_4429(settings):
    """Refused before the buckets, they were never limited nor counted: a client could send
    them as fast as the socket carried frames, for ever."""
    settings.REALTIME = {"PUBLISH_RATE": 0.001, "PUBLISH_BURST": 2, "ABUSE_LIMIT": 3}
    owner, _project = await make_project()
    client = await client_for(owner)
    codes = []
    for _ in range(5):
        reply = await client.request("publish", stream="nope:1", type="v1:typing.started")
        codes.append(reply["error"]["code"])
    # Each took a token, as any publish does; past the burst they are refused as too fast,
    # which counts as abuse (refusals 1 to 3 here).
    assert codes == ["unknown_stream"] * 2 + ["rate_limited"] * 3
    await client.send({"op": "publish", "stream": "nope:1", "type": "v1:typing.started"})
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4429}


async def test_subscribe_churn_is_rate_limited(settings):
    settings.REALTIME = {"SUBSCRIBE_RATE": 0.001, "SUBSCRIBE_BURST": 2, "ABUSE_LIMIT": 1}
    owner, project = await make_project()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    for _ in range(2):  # each cycle would tell a presence stream's members twice
        assert (await client.subscribe(stream))["ok"] is True
        assert (await client.request("unsubscribe", stream=stream))["ok"] is True
    for _ in range(3):  # past the abuse limit, yet a refusal to come back too fast is no abuse
        assert (await client.subscribe(stream))["error"]["code"] == "rate_limited"
    await client.send({"op": "ping", "ref": "p"})
    assert (await client.receive_until("pong"))["ref"] == "p"
    await client.close()


async def test_client_event_data_is_capped_per_stream_kind():
    owner, project = await make_project()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    small = {"stream": stream, "type": "v1:typing.started", "data": {"text": "x" * 100}}
    assert (await client.request("publish", **small))["ok"] is True
    big = {**small, "data": {"text": "x" * 3000}}  # under the frame limit, over the event's
    refused = await client.request("publish", **big)
    assert refused["error"]["code"] == "event_not_allowed"
    assert "2048 bytes" in refused["error"]["message"]
    await client.close()


async def test_a_publish_the_layer_does_not_take_in_time_is_refused_and_the_socket_goes_on(
    settings, monkeypatch
):
    import asyncio

    from channels.layers import get_channel_layer

    settings.REALTIME = {"PUBLISH_TIMEOUT": 0.2}
    owner, project = await make_project()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    await client.subscribe(stream)
    layer = get_channel_layer()
    original = layer.group_send

    async def stuck(group, message):
        if message.get("ephemeral"):
            await asyncio.sleep(3600)  # a layer that hangs (Redis paused) on client events
        await original(group, message)

    monkeypatch.setattr(layer, "group_send", stuck)
    reply = await client.request("publish", stream=stream, type="v1:typing.started", data={})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "internal_error"
    assert "not sent" in reply["error"]["message"]
    await client.send({"op": "ping", "ref": "p"})
    assert (await client.receive_until("pong"))["ref"] == "p"
    await client.close()


async def test_publish_is_reauthorized_every_time():
    _owner, project = await make_project()
    stranger = await db(UserFactory)()
    client = await client_for(stranger)
    reply = await client.request(
        "publish", stream=f"project:{project.pk}", type="v1:typing.started", data={}
    )
    assert reply["error"]["code"] == "forbidden"
    await client.close()


# -- malformed input and limits -----------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        # Python reads these, JSON has no such values, and other browsers could not parse
        # the event they would make.
        (
            '{"op": "publish", "stream": "project:1", "type": "v1:typing.started", "data": NaN}',
            "invalid_json",
        ),
        ('{"op": "ping", "ref": "p", "x": -Infinity}', "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"op": "dance"}', "unknown_op"),
        ('{"op": "subscribe"}', "invalid_frame"),
        ('{"op": "subscribe", "stream": 42}', "invalid_frame"),
        ('{"op": "subscribe", "stream": "no"}', "invalid_stream"),
        # The same group as project:1, but not the same name in the hub: leaving it would
        # have left the group for every socket of the node.
        ('{"op": "subscribe", "stream": "project:1\\n"}', "invalid_stream"),
        ('{"op": "subscribe", "stream": "project:1", "since": "3"}', "invalid_frame"),
        ('{"op": "subscribe", "stream": "project:1", "since": true}', "invalid_frame"),
        ('{"op": "subscribe", "stream": "project:1", "since": -1}', "invalid_frame"),
        ('{"op": "subscribe", "stream": "project:1", "version": "2"}', "unsupported_version"),
        ('{"op": "publish", "stream": "project:1", "type": "typing"}', "invalid_frame"),
        ('{"op": "ping", "ref": 5}', "invalid_frame"),
        ("[" * 10_000 + "]" * 10_000, "too_deep"),
        ('{"op": "ping", "x": ' + "[" * 40 + "]" * 40 + "}", "too_deep"),
        ('{"op": "unsubscribe", "stream": "project:1"}', "not_subscribed"),
        # Valid JSON that no frame could carry on: a number no double holds, lone surrogates.
        (
            '{"op":"publish","ref":"r","stream":"project:1","type":"v1:typing.started",'
            '"data":{"x":1e999}}',
            "invalid_json",
        ),
        (
            '{"op":"publish","ref":"r","stream":"project:1","type":"v1:typing.started",'
            '"data":{"x":"\\udc00"}}',
            "invalid_frame",
        ),
        ('{"op":"ping","ref":"\\ud800"}', "invalid_frame"),
    ],
)
async def test_malformed_frames_get_documented_codes(frame, code):
    owner, _ = await make_project()
    client = await client_for(owner)
    await client.send(frame)
    reply = await client.receive_until("reply")
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert "Traceback" not in json.dumps(reply)
    json.dumps(reply, ensure_ascii=False).encode("utf-8")  # the answer itself can be sent
    await client.close()


async def test_binary_frames_are_refused():
    owner, _ = await make_project()
    client = await client_for(owner)
    await client.communicator.send_to(bytes_data=b"\x00\x01")
    assert (await client.receive_until("reply"))["error"]["code"] == "binary_not_supported"
    await client.close()


async def test_repeated_malformed_frames_close_with_4400(settings):
    settings.REALTIME = {"MALFORMED_LIMIT": 3}
    owner, _ = await make_project()
    client = await client_for(owner)
    for _ in range(4):
        await client.send("nope")
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4400}


async def test_deep_frames_with_an_escape_are_too_deep_and_count_as_malformed(caplog):
    """The lone-surrogate check runs before the depth check, on any nesting the parser took:
    a `\\u` escape made it recurse into an internal error instead of `too_deep`."""
    from realtime.conf import realtime_settings

    deep = '{"op":"ping","x":"\\u0041","y":' + "[" * 450 + "]" * 450 + "}"
    owner, _ = await make_project()
    client = await client_for(owner)
    for _ in range(int(realtime_settings.MALFORMED_LIMIT) + 1):  # the default limit, 10
        await client.send(deep)
        reply = await client.receive_until("reply")
        assert reply["error"]["code"] == "too_deep", reply
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4400}
    assert "error handling a frame" not in caplog.text


async def test_malformed_frames_count_for_the_sockets_life(settings):
    settings.REALTIME = {"MALFORMED_LIMIT": 3}
    owner, _ = await make_project()
    client = await client_for(owner)
    for _ in range(3):  # good frames between them do not clear the count
        await client.send("nope")
        await client.send({"op": "ping", "ref": "p"})
        assert (await client.receive_until("pong"))["ref"] == "p"
    await client.send("nope")
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4400}


async def test_only_an_accepted_publish_clears_refusals(settings):
    settings.REALTIME = {"ABUSE_LIMIT": 3}
    owner, project = await make_project()
    stranger_project = await db(ProjectFactory)()
    client = await client_for(owner)
    own, other = f"project:{project.pk}", f"project:{stranger_project.pk}"
    for _ in range(3):  # a refused subscribe, then one that succeeds, clears nothing
        assert (await client.subscribe(other))["error"]["code"] == "forbidden"
        assert (await client.subscribe(own))["ok"] is True
        assert (await client.request("unsubscribe", stream=own))["ok"] is True
    await client.send({"op": "subscribe", "ref": "x", "stream": other})
    assert (await client.receive_until("never")) == {"type": "websocket.close", "code": 4429}


async def test_oversize_frame_closes_with_4413(settings):
    settings.REALTIME = {"MAX_FRAME_BYTES": 1024}
    owner, _ = await make_project()
    client = await client_for(owner)
    await client.send({"op": "ping", "pad": "x" * 2000})
    reply = await client.receive()
    assert reply["error"]["code"] == "frame_too_large"
    assert (await client.receive()) == {"type": "websocket.close", "code": 4413}


async def test_ping_pong_and_subscription_limit(settings):
    settings.REALTIME = {"MAX_SUBSCRIPTIONS": 1}
    owner, _ = await make_project()
    client = await client_for(owner)
    await client.send({"op": "ping", "ref": "p1"})
    assert await client.receive_until("pong") == {"op": "pong", "ref": "p1"}
    assert (await client.subscribe(f"user:{owner.pk}"))["ok"] is True
    again = await client.subscribe(f"user:{owner.pk}")
    assert again["error"]["code"] == "already_subscribed"
    assert (await client.subscribe("tenant:1"))["error"]["code"] == "too_many_subscriptions"
    await client.close()


# -- liveness -----------------------------------------------------------------------------


async def test_silent_socket_is_pinged_then_closed_with_4408(settings):
    settings.REALTIME = {"HEARTBEAT": 0.2}
    owner, _ = await make_project()
    client = await client_for(owner)
    assert client.welcome["heartbeat"] == 0.2
    assert (await client.receive(timeout=2))["op"] == "ping"
    assert (await client.receive_until("never", timeout=3)) == {
        "type": "websocket.close",
        "code": 4408,
    }


async def test_answering_pings_keeps_the_socket_open(settings):
    settings.REALTIME = {"HEARTBEAT": 0.2}
    owner, _ = await make_project()
    client = await client_for(owner)
    for _ in range(5):
        assert (await client.receive(timeout=2))["op"] == "ping"
        await client.send({"op": "pong"})
    await client.send({"op": "ping", "ref": "still"})
    assert (await client.receive_until("pong"))["ref"] == "still"
    await client.close()


async def test_reader_that_never_acknowledges_is_closed_as_slow_consumer(settings):
    settings.REALTIME = {"MAX_UNACKED_BYTES": 2000}
    owner, project = await make_project()
    client = await client_for(owner)
    await client.subscribe(f"project:{project.pk}")

    def flood():
        for n in range(20):
            Item.objects.create(project=project, title="x" * 100 + str(n))

    await db(flood)()
    while True:
        frame = await client.receive()
        if frame.get("type") == "websocket.close":
            break
    assert frame["code"] == 4409


async def test_connection_row_records_tenant_version_and_subscriptions(admin_client):
    import asyncio

    from .factories import OrganizationFactory

    owner, project = await make_project()
    org = await db(OrganizationFactory)()
    await db(org.members.add)(owner)
    session = await db(session_for)(owner)
    client = RealtimeClient(session_key=session, path="/ws/realtime/?v=js-1.2")
    welcome = await client.connect()
    await client.subscribe(f"project:{project.pk}")
    await client.subscribe(f"user:{owner.pk}")
    row = None
    for _ in range(50):
        row = await db(Connection.objects.get)(pk=welcome["connectionId"])
        if len(row.subscriptions) == 2:
            break
        await asyncio.sleep(0.02)
    assert row.subscriptions == sorted([f"project:{project.pk}", f"user:{owner.pk}"])
    assert (row.tenant, row.client_version) == (str(org.pk), "js-1.2")
    page = await db(admin_client.get)("/admin/realtime/connection/")
    assert welcome["connectionId"].encode() in page.content
    await client.close()


async def test_leaving_the_organization_ends_the_tenant_stream():
    from .factories import OrganizationFactory

    member = await db(UserFactory)()
    org = await db(OrganizationFactory)()
    await db(org.members.add)(member)
    client = await client_for(member)
    assert (await client.subscribe(f"tenant:{org.pk}"))["ok"] is True
    await db(org.members.remove)(member)
    frame = await client.receive_until("unsubscribed", timeout=1.0)
    assert frame["stream"] == f"tenant:{org.pk}"
    assert frame["reason"] == "forbidden"
    await client.close()


async def test_deactivated_user_is_disconnected():
    owner, _ = await make_project()
    client = await client_for(owner)
    owner.is_active = False
    await db(owner.save)()
    assert (await client.receive_until("never", timeout=2.0)) == {
        "type": "websocket.close",
        "code": 4401,
    }


class CountingHooks:
    def __init__(self, slow_stream_kind: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.slow_stream_kind = slow_stream_kind
        self.slowed = False

    async def connected(self, connection):
        self.calls.append(("connected", ""))

    async def unsubscribed(self, connection, stream, policy, reason):
        import asyncio

        if self.slow_stream_kind and stream.startswith(self.slow_stream_kind) and not self.slowed:
            self.slowed = True
            await asyncio.sleep(5)  # cut off by the server's cancel
        self.calls.append(("unsubscribed", stream))

    async def disconnected(self, connection):
        self.calls.append(("disconnected", ""))


async def test_a_disconnect_cut_off_and_finished_later_calls_each_hook_once():
    import asyncio

    from realtime import hooks

    counting = CountingHooks(slow_stream_kind="project:")
    hooks.register_hooks(counting)
    try:
        owner, project = await make_project()
        client = await client_for(owner)
        assert (await client.subscribe(f"user:{owner.pk}"))["ok"]
        assert (await client.subscribe(f"project:{project.pk}"))["ok"]
        await client.communicator.send_input({"type": "websocket.disconnect", "code": 1001})
        await asyncio.sleep(0.3)
        client.communicator.future.cancel()  # the server stops waiting for the app
        await asyncio.sleep(0.5)
        unsubscribed = [stream for kind, stream in counting.calls if kind == "unsubscribed"]
        assert sorted(unsubscribed) == sorted([f"user:{owner.pk}", f"project:{project.pk}"])
    finally:
        hooks.unregister_hooks(counting)


async def test_a_socket_refused_by_the_handshakes_sign_in_check_calls_no_hook(monkeypatch):
    from realtime import hooks

    counting = CountingHooks()
    hooks.register_hooks(counting)
    try:
        client = await logged_out_while_its_row_is_written(monkeypatch)
        await client.communicator.connect()
        assert await client.receive(timeout=3) == {"type": "websocket.close", "code": 4000}
        await client.communicator.disconnect()
        assert counting.calls == []  # no `disconnected` for a `connected` that never ran
    finally:
        hooks.unregister_hooks(counting)


async def test_an_idle_subscribed_socket_keeps_its_state_compact():
    """Tens of thousands of sockets per process (the 40 KiB target, docs/performance.md): a
    socket's own state is in slots, so its `__dict__` stays far below the 30 keys CPython
    stores in the object itself (past them, a dict of 1.6 KiB per socket)."""
    import gc

    from realtime.consumers import RealtimeConsumer

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    client = RealtimeClient(session_key=await db(session_for)(owner))
    welcome = await client.connect()
    for ref, stream in (("p", f"project:{project.pk}"), ("u", f"user:{owner.pk}")):
        await client.send({"op": "subscribe", "ref": ref, "stream": stream})
        assert (await client.receive_until("reply"))["ok"] is True
    await client.send({"op": "ping"})
    await client.receive_until("pong")
    (consumer,) = [  # others of earlier tests may not be collected yet
        o
        for o in gc.get_objects()
        if issubclass(type(o), RealtimeConsumer)  # not isinstance: a dead weakref.proxy raises
        and getattr(o, "connection_id", None) == welcome["connectionId"]
    ]
    assert len(consumer.subscriptions) == 2
    # Only Channels' own attribute is left outside the slots: one the consumer sets and its
    # slots do not name lands here, and 30 of them would cost the dict again.
    assert set(vars(consumer)) <= {"groups"}, sorted(vars(consumer))
    for subscription in consumer.subscriptions.values():
        assert subscription.above == ()  # no set made (216 bytes) until a seq comes early
    await client.close()
