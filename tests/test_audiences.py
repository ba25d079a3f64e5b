"""Audiences: payload variants by permission, serialized once per event and audience.

The demo's `project:<pk>` stream declares an `owner` audience (whoever may delete the
project): its events carry the project's members to them, and to no other reader, over the
WebSocket, SSE and the event feed alike, live and replayed.
"""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from django.core import checks
from django.test import AsyncClient

import realtime
from board.membership import add_member, grant_owner
from board.models import Project
from realtime.cursor import Position, encode
from realtime.events import pick_frame
from realtime.models import Event
from realtime.policies import StreamPolicy, stream_access, stream_kinds
from realtime.testing import RealtimeClient, session_for

from .factories import ProjectFactory, UserFactory
from .test_sse import open_sse

pytestmark = pytest.mark.django_db(transaction=True)
db = sync_to_async


async def client_for(user, **kwargs) -> RealtimeClient:
    client = RealtimeClient(session_key=await db(session_for)(user), **kwargs)
    await client.connect()
    return client


def _project_with_people():
    """A project whose owner may delete it, with one plain member."""
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    grant_owner(project, owner)
    member = UserFactory()
    add_member(project, member, by=owner)
    return owner, member, Project.objects.get(pk=project.pk)


async def next_event(client: RealtimeClient, prefix: str = "v1:project.") -> dict:
    """The next logged event whose type starts with `prefix` (presence frames pass by)."""
    while True:
        frame = await client.receive_until("event")
        if frame["type"].startswith(prefix):
            return frame


async def rename(project, name: str) -> None:
    project.name = name
    await db(project.save)()


@pytest.mark.asyncio
async def test_owners_get_their_payload_and_members_the_default_one_over_the_websocket():
    owner, member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    owner_client, member_client = await client_for(owner), await client_for(member)
    assert (await owner_client.subscribe(stream))["ok"] is True
    assert (await member_client.subscribe(stream))["ok"] is True
    await rename(project, "Renamed")
    to_owner = await next_event(owner_client)
    to_member = await next_event(member_client)
    assert to_owner["data"] == {
        "id": project.pk,
        "organization": project.organization_id,
        "name": "Renamed",
        "owner": owner.pk,
        "members": [member.pk],
    }
    assert to_member["data"] == {
        "id": project.pk,
        "organization": project.organization_id,
        "name": "Renamed",
        "owner": owner.pk,
    }
    # One event: same position, identity and type for both.
    for key in ("stream", "seq", "eventId", "type", "timestamp", "correlationId"):
        assert to_owner[key] == to_member[key]
    await owner_client.close()
    await member_client.close()


def owner_serializations(monkeypatch) -> list[int]:
    """The pks of the projects `ProjectOwnerSerializer` serializes from now on."""
    from board import serializers

    calls: list[int] = []
    original = serializers.ProjectOwnerSerializer.to_representation

    def counting(self, instance):
        calls.append(instance.pk)
        return original(self, instance)

    monkeypatch.setattr(serializers.ProjectOwnerSerializer, "to_representation", counting)
    return calls


def test_the_log_holds_one_payload_per_audience_and_serializes_each_once(monkeypatch):
    calls = owner_serializations(monkeypatch)
    _owner, member, project = _project_with_people()
    calls.clear()
    project.name = "Once"
    project.save()
    assert calls == [project.pk]  # once, whatever the number of owners subscribed
    project_event = Event.objects.filter(stream__name=f"project:{project.pk}").latest("seq")
    assert set(project_event.variants) == {"v1/owner"}
    assert project_event.variants["v1/owner"]["data"]["members"] == [member.pk]
    assert "members" not in project_event.data
    # The organization's stream declares no owner audience: no such payload goes there.
    tenant_event = Event.objects.filter(stream__name=f"tenant:{project.organization_id}").latest(
        "seq"
    )
    assert tenant_event.variants == {}
    assert tenant_event.event_id != project_event.event_id


async def audience_becomes(subscription, audience, wait: float = 5.0) -> None:
    """Wait (bounded) until the socket has decided `subscription`'s audience as `audience`."""
    import asyncio

    async with asyncio.timeout(wait):
        while subscription.audience != audience:  # noqa: ASYNC110 (set by the socket, no event to wait on)
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_a_member_made_owner_gets_the_owner_payload_from_the_next_event_and_back():
    from guardian.shortcuts import assign_perm, remove_perm

    from realtime.fanout import get_hub

    _owner, member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    client = await client_for(member)
    assert (await client.subscribe(stream))["ok"] is True
    [subscription] = get_hub().members[stream]
    await db(assign_perm)("board.delete_project", member, project)
    await audience_becomes(subscription, "owner")  # the permission change reached the socket
    await rename(project, "Promoted")
    promoted = await next_event(client)
    assert promoted["data"]["members"] == [member.pk]
    await db(remove_perm)("board.delete_project", member, project)
    await audience_becomes(subscription, None)
    await rename(project, "Demoted")
    demoted = await next_event(client)
    assert demoted["data"]["name"] == "Demoted"
    assert "members" not in demoted["data"]
    await client.close()


@pytest.mark.asyncio
async def test_replay_gives_each_reader_its_audience_payload():
    owner, member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    since = (await db(Event.objects.filter(stream__name=stream).latest)("seq")).seq
    await rename(project, "While away")
    for user, has_members in ((owner, True), (member, False)):
        client = await client_for(user)
        reply = await client.subscribe(stream, since=since)
        assert reply["data"]["recovered"] is True
        event = await next_event(client)
        assert event["data"]["name"] == "While away"
        assert ("members" in event["data"]) is has_members
        await client.close()


@pytest.mark.asyncio
async def test_member_changes_reach_the_owner_as_project_updates():
    owner, member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    assert (await client.subscribe(stream))["ok"] is True
    newcomer = await db(UserFactory)()
    await db(add_member)(project, newcomer, by=owner)
    event = await next_event(client)
    assert event["type"] == "v1:project.updated"
    assert sorted(event["data"]["members"]) == sorted([member.pk, newcomer.pk])
    await db(newcomer.projects.clear)()  # from the user's side of the relation
    event = await next_event(client)
    assert event["data"]["members"] == [member.pk]
    await client.close()


@pytest.mark.asyncio
async def test_sse_and_the_feed_give_each_reader_the_same_frames_as_the_websocket():
    owner, member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    head = (await db(Event.objects.filter(stream__name=stream).latest)("seq")).seq
    frames: dict[str, list[dict]] = {}
    readers = {}
    for name, user in (("owner", owner), ("member", member)):
        ws = await client_for(user)
        assert (await ws.subscribe(stream))["ok"] is True
        sse, _opened = await open_sse(user, stream)
        readers[name] = (ws, sse)
    await rename(project, "Everywhere")
    for name, user in (("owner", owner), ("member", member)):
        ws, sse = readers[name]
        over_ws = await next_event(ws)
        over_sse = (await sse.event("v1:project.updated"))["data"]
        http = AsyncClient()
        await http.aforce_login(user)
        cursor = encode({stream: Position(head, None)})
        feed = await http.get("/api/realtime/events/", {"streams": stream, "cursor": cursor})
        [over_feed] = feed.json()["events"]
        assert over_ws == over_sse == over_feed
        frames[name] = over_ws
        await ws.close()
        await sse.close()
    assert frames["owner"]["data"]["members"] == [member.pk]
    assert "members" not in frames["member"]["data"]


@pytest.mark.asyncio
async def test_an_owner_reading_the_project_over_rest_gets_its_members():
    owner, member, project = await db(_project_with_people)()
    results = {}
    for name, user in (("owner", owner), ("member", member)):
        http = AsyncClient()
        await http.aforce_login(user)
        response = await http.get(f"/api/projects/{project.pk}/")
        assert response.status_code == 200
        results[name] = response
    assert results["owner"].json()["members"] == [member.pk]
    assert "members" not in results["member"].json()
    assert results["owner"]["ETag"] != results["member"]["ETag"]


# -- any policy, any event ---------------------------------------------------------------


class StaffSeeMore(StreamPolicy):
    """`desk:<key>`: every user; staff get the `staff` payload."""

    audiences = {"staff": lambda user, key: user.is_staff}

    def authorize(self, user, key):
        return True


@pytest.fixture
def desk():
    stream_kinds.register("desk", StaffSeeMore)
    yield
    stream_kinds.unregister("desk")


@pytest.mark.asyncio
async def test_emit_takes_payloads_by_audience_and_events_without_one_get_the_default(desk):
    staff = await db(UserFactory)(is_staff=True)
    plain = await db(UserFactory)()
    staff_client, plain_client = await client_for(staff), await client_for(plain)
    for client in (staff_client, plain_client):
        assert (await client.subscribe("desk:1"))["ok"] is True
    await db(realtime.emit)(
        "desk:1", "v1:ticket.opened", {"id": 7}, audiences={"staff": {"id": 7, "by": "Ann"}}
    )
    await db(realtime.emit)("desk:1", "v1:ticket.closed", {"id": 7})
    assert (await next_event(staff_client, "v1:ticket."))["data"] == {"id": 7, "by": "Ann"}
    assert (await next_event(plain_client, "v1:ticket."))["data"] == {"id": 7}
    # An event with no payload for the audience gives it the default one.
    assert (await next_event(staff_client, "v1:ticket."))["data"] == {"id": 7}
    assert (await next_event(plain_client, "v1:ticket."))["data"] == {"id": 7}
    await staff_client.close()
    await plain_client.close()


@pytest.mark.asyncio
async def test_a_version_and_an_audience_together(desk):
    staff = await db(UserFactory)(is_staff=True)
    client = await client_for(staff)
    assert (await client.subscribe("desk:1", version="v2"))["ok"] is True
    await db(realtime.emit)(
        "desk:1",
        "v1:ticket.opened",
        {"v": 1},
        variants={"v2": ("v2:ticket.opened", {"v": 2}), "v2/staff": ("v2:ticket.opened", {"s": 2})},
        audiences={"staff": {"s": 1}},
    )
    event = await next_event(client, "v2:ticket.")
    assert (event["type"], event["data"]) == ("v2:ticket.opened", {"s": 2})
    await client.close()


@pytest.mark.asyncio
async def test_an_audience_test_that_raises_refuses_the_subscription(desk, caplog):
    def broken(user, key):
        raise RuntimeError("directory down")

    StaffSeeMore.audiences = {"staff": broken}
    try:
        client = await client_for(await db(UserFactory)())
        reply = await client.subscribe("desk:1")
        assert reply["error"]["code"] == "forbidden"  # fail closed, never the wider payload
        assert "directory down" not in json.dumps(reply)
        assert "policy for desk:1 raised" in caplog.text
        await client.close()
    finally:
        StaffSeeMore.audiences = {"staff": lambda user, key: user.is_staff}


def test_stream_access_says_who_gets_which_payload(desk):
    staff, plain = UserFactory(is_staff=True), UserFactory()
    assert stream_access(staff, "desk:1") == (None, "staff")
    assert stream_access(plain, "desk:1") == (None, "")
    assert stream_access(plain, "nowhere:1") == ("unknown_stream", None)


def test_pick_frame_prefers_version_and_audience_and_falls_back():
    frames = {"v1": "a", "v2": "b", "v1/owner": "c"}
    assert pick_frame(frames, None, "owner") == "c"
    assert pick_frame(frames, "v1", "owner") == "c"
    assert pick_frame(frames, "v2", "owner") == "b"  # no v2 payload for owners: v2's default
    assert pick_frame(frames, "v9", "owner") == "c"  # no v9: the primary version's
    assert pick_frame(frames, "v1", "staff") == "a"
    assert pick_frame(frames, None, None) == "a"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audiences": {"Bad Name": {}}}, "invalid variant 'v1/Bad Name'"),
        ({"audiences": {"staff": float("nan")}}, "Out of range float"),
        ({"variants": {"v2/staff": ("v2:ticket.opened", {})}}, "invalid variant 'v2/staff'"),
        ({"variants": {"v1": ("v1:ticket.opened", {})}}, "invalid variant 'v1'"),
        (
            {"audiences": {"staff": {}}, "variants": {"v1/staff": ("v1:ticket.opened", {})}},
            "audience 'staff' given twice",
        ),
    ],
)
def test_emit_refuses_a_bad_audience_payload(kwargs, message):
    with pytest.raises(ValueError, match=message):
        realtime.emit("desk:1", "v1:ticket.opened", {}, **kwargs)
    assert not Event.objects.exists()


def test_registration_audiences_are_checked():
    from realtime.checks import check_registrations
    from realtime.registry import registry

    class Bad:
        pass

    registry.register(
        Project,
        streams="project:{pk}",
        version="v7",
        audiences={"Owner!": None, "staff": Bad()},
    )
    try:
        errors = [e for e in check_registrations() if e.id == "realtime.E002"]
        text = " ".join(e.msg for e in errors)
        assert "audiences key 'Owner!' is not an audience name" in text
        assert "audiences['staff']: a serializer must be" in text
    finally:
        registry.unregister(Project, version="v7")
    assert [e for e in checks.run_checks() if e.id == "realtime.E002"] == []


def test_policy_audiences_that_cannot_work_are_reported():
    from realtime.checks import check_audiences
    from realtime.policies import ObjectPolicy

    class Broken(StreamPolicy):
        audiences = {"Staff": lambda user, key: True, "staff": "no.such.module.test", "x": 3}

    class NotADict(StreamPolicy):
        audiences = ["owner"]

    class BarePermission(ObjectPolicy):
        model = Project
        permission = "board.view_project"
        audiences = {"owner": "delete_project"}

    for kind, policy in (("broken", Broken), ("listy", NotADict), ("bare", BarePermission)):
        stream_kinds.register(kind, policy)
    try:
        text = "\n".join(m.msg for m in check_audiences() if m.id == "realtime.E022")
    finally:
        for kind in ("broken", "listy", "bare"):
            stream_kinds.unregister(kind)
    assert "'Staff' is not an audience name" in text
    assert "'staff': 'no.such.module.test' cannot be imported" in text
    assert "'x': a test is a callable (user, key) -> bool, not 3" in text
    assert "NotADict.audiences (stream kind 'listy') must be a dict" in text
    assert "a permission is 'app_label.codename', not 'delete_project'" in text
    assert check_audiences() == []  # the demo's own are fine


def test_a_registration_audience_no_policy_declares_is_a_warning():
    from realtime.checks import check_audiences
    from realtime.registry import registry

    registry.register(
        Project, streams="tenant:{organization_id}", version="v7", audiences={"owner": None}
    )
    try:
        [warning] = check_audiences()
    finally:
        registry.unregister(Project, version="v7")
    assert warning.id == "realtime.W023"
    assert "audiences['owner'] is declared by no policy of its streams' kinds (tenant)" in (
        warning.msg
    )


@pytest.mark.asyncio
async def test_the_owners_etag_moves_when_the_members_change():
    owner, _member, project = await db(_project_with_people)()
    http = AsyncClient()
    await http.aforce_login(owner)
    first = await http.get(f"/api/projects/{project.pk}/")
    same = await http.get(f"/api/projects/{project.pk}/", headers={"If-None-Match": first["ETag"]})
    assert same.status_code == 304
    await db(add_member)(project, await db(UserFactory)(), by=owner)
    after = await http.get(f"/api/projects/{project.pk}/", headers={"If-None-Match": first["ETag"]})
    assert after.status_code == 200
    assert len(after.json()["members"]) == 2


@pytest.mark.asyncio
async def test_a_policy_that_raises_refuses_the_feed_and_sse_with_403_not_a_500(desk, caplog):
    def broken(user, key):
        raise RuntimeError("directory down")

    StaffSeeMore.audiences = {"staff": broken}
    try:
        http = AsyncClient()
        await http.aforce_login(await db(UserFactory)())
        for path in ("/api/realtime/events/", "/realtime/sse/"):
            response = await http.get(path, {"streams": "desk:1"})
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "forbidden"
            assert b"directory down" not in response.content
        assert caplog.text.count("policy for desk:1 raised") == 2
    finally:
        StaffSeeMore.audiences = {"staff": lambda user, key: user.is_staff}


def test_a_save_on_a_stream_whose_policy_does_not_import_logs_the_default_payload_only(
    settings, caplog
):
    from realtime.registry import registry

    settings.REALTIME = {"STREAM_POLICIES": {"desk": "no.such.module.Policy"}}
    registry.register(
        Project, streams="desk:{pk}", version="v7", audiences={"staff": lambda p: {"all": 1}}
    )
    try:
        _owner, _member, project = _project_with_people()  # saves, and saves again below
        project.name = "Still saved"
        project.save()
    finally:
        registry.unregister(Project, version="v7")
    event = Event.objects.filter(stream__name=f"desk:{project.pk}").latest("seq")
    assert (event.type, event.variants) == ("v7:project.updated", {})
    assert f"no policy for desk:{project.pk}" in caplog.text


@pytest.mark.asyncio
async def test_a_resyncs_older_decision_does_not_undo_a_revocation_decided_since(monkeypatch):
    import time

    from guardian.shortcuts import remove_perm

    from board.policies import ProjectPolicy
    from realtime.fanout import get_hub

    owner, _member, project = await db(_project_with_people)()
    stream = f"project:{project.pk}"
    client = await client_for(owner)
    assert (await client.subscribe(stream))["ok"] is True
    [subscription] = get_hub().members[stream]
    original, slow = ProjectPolicy.access, [True]

    def access(self, user, kind, key):
        decided = original(self, user, kind, key)
        if slow:  # the resync's decision: made now ("owner"), handed back late
            slow.pop()
            time.sleep(1.0)
        return decided

    monkeypatch.setattr(ProjectPolicy, "access", access)
    subscription.resync()  # as the tail check or a layer stall does
    await client.nothing_more(0.2)  # the resync is deciding
    await db(remove_perm)("board.delete_project", owner, project)
    await client.nothing_more(1.5)  # the revocation is decided, then the resync's comes back
    assert subscription.audience is None
    await rename(project, "After")
    event = await next_event(client)
    assert event["data"]["name"] == "After"
    assert "members" not in event["data"]
    await client.close()


def test_a_kind_with_its_own_redacted_payload_gets_no_audience_payload(desk):
    from realtime.registry import registry

    registry.register(
        Project,
        streams="desk:{pk}",
        version="v7",
        stream_serializers={"desk": lambda project: {"id": project.pk}},
        audiences={"staff": None},  # every field: never on a kind redacted on purpose
    )
    try:
        _owner, _member, project = _project_with_people()
    finally:
        registry.unregister(Project, version="v7")
    event = Event.objects.filter(stream__name=f"desk:{project.pk}").latest("seq")
    assert event.data == {"id": project.pk}
    assert event.variants == {}


def test_deciding_the_audience_costs_no_query_more_than_the_authorization():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from board.policies import ProjectPolicy

    owner, member, project = _project_with_people()
    policy = ProjectPolicy()
    key = str(project.pk)
    for user, audience in ((owner, "owner"), (member, "")):
        with CaptureQueriesContext(connection) as checked:
            assert policy.check(user, "project", key) is True
        with CaptureQueriesContext(connection) as accessed:
            assert policy.access(user, "project", key) == audience
        assert len(accessed) == len(checked), [q["sql"] for q in accessed]
    # A string test is a permission on the object, not a dotted path to import.
    ProjectPolicy.audiences = {"owner": "board.audiences.is_editor"}
    try:
        assert policy.access(owner, "project", key) == ""
    finally:
        ProjectPolicy.audiences = {"owner": "board.delete_project"}


@pytest.mark.asyncio
async def test_two_owners_subscribed_cost_one_owner_serialization(monkeypatch):
    from guardian.shortcuts import assign_perm

    owner, member, project = await db(_project_with_people)()
    await db(assign_perm)("board.delete_project", member, project)  # a second owner
    stream = f"project:{project.pk}"
    clients = [await client_for(owner), await client_for(member)]
    for client in clients:
        assert (await client.subscribe(stream))["ok"] is True
    calls = owner_serializations(monkeypatch)
    await rename(project, "Both")
    for client in clients:
        assert (await next_event(client))["data"]["members"] == [member.pk]
        await client.close()
    assert calls == [project.pk]  # once for the event, not once per owner
