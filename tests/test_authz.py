"""Authorization after subscribe: publish decided per frame, group membership changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group
from guardian.shortcuts import assign_perm

from board.membership import add_member, remove_member
from realtime.testing import RealtimeClient, session_for

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

db = sync_to_async
TYPING = "v1:typing.started"


async def client_for(user: Any) -> RealtimeClient:
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    return client


async def item_event(client: RealtimeClient) -> dict[str, Any]:
    """The next event of an item, skipping presence events (the project tracks presence)."""
    while True:
        frame = await client.receive_until("event")
        if not frame.get("type", "").startswith("v1:presence."):
            return frame


async def no_item_event(client: RealtimeClient, timeout: float = 0.5) -> bool:  # noqa: ASYNC109
    """Whether nothing but pings and presence events arrives within `timeout`."""
    while not await client.communicator.receive_nothing(timeout):
        frame = await client.receive()
        presence = frame.get("op") == "event" and frame["type"].startswith("v1:presence.")
        if frame.get("op") != "ping" and not presence:
            return False
    return True


async def owner_and_member_on_a_project() -> tuple[Any, Any, Any, RealtimeClient, RealtimeClient]:
    """A project's owner watching its stream, and a member's socket to publish from."""
    owner = await db(UserFactory)()
    project: Any = await db(ProjectFactory)(owner=owner)
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    stream = f"project:{project.pk}"
    watcher, sender = await client_for(owner), await client_for(member)
    assert (await watcher.subscribe(stream))["ok"] is True
    return owner, member, project, watcher, sender


async def test_publish_is_refused_once_the_permission_is_revoked_on_the_same_socket():
    _owner, member, project, watcher, sender = await owner_and_member_on_a_project()
    stream = f"project:{project.pk}"

    first = await sender.request("publish", stream=stream, type=TYPING, data={"field": "a"})
    assert first["ok"] is True
    typing = await watcher.receive_until("event")
    assert (typing["type"], typing["data"]["field"]) == (TYPING, "a")

    await db(remove_member)(project, member)
    second = await sender.request("publish", stream=stream, type=TYPING, data={"field": "b"})
    assert second["ok"] is False
    assert second["error"]["code"] == "forbidden"
    # The refused event went nowhere (the watcher hears of the member change only).
    while not await watcher.communicator.receive_nothing(0.5):
        assert (await watcher.receive()).get("type") != TYPING
    # Same socket throughout: it is still open and answers.
    await sender.send({"op": "ping", "ref": "alive"})
    assert (await sender.receive_until("pong"))["ref"] == "alive"
    await watcher.close()
    await sender.close()


def _user_leaves_group(user: Any, group: Group) -> None:
    user.groups.remove(group)


def _user_clears_groups(user: Any, group: Group) -> None:
    user.groups.clear()


def _group_removes_user(user: Any, group: Group) -> None:
    group.user_set.remove(user)


def _group_clears_users(user: Any, group: Group) -> None:
    group.user_set.clear()


@pytest.mark.parametrize(
    ("change", "bystander_loses_access"),
    [
        pytest.param(_user_leaves_group, False, id="user.groups.remove"),
        pytest.param(_user_clears_groups, False, id="user.groups.clear"),
        pytest.param(_group_removes_user, False, id="group.user_set.remove"),
        pytest.param(_group_clears_users, True, id="group.user_set.clear"),
    ],
)
async def test_leaving_the_group_that_grants_access_ends_the_subscription(
    change: Callable[[Any, Group], None], bystander_loses_access: bool
):
    project: Any = await db(ProjectFactory)()
    group = await db(Group.objects.create)(name="project-readers")
    await db(assign_perm)("board.view_project", group, project)
    member: Any = await db(UserFactory)()
    bystander: Any = await db(UserFactory)()
    for user in (member, bystander):
        await db(user.groups.add)(group)  # the group is their only access to the project
    stream = f"project:{project.pk}"
    client, other = await client_for(member), await client_for(bystander)
    assert (await client.subscribe(stream))["ok"] is True
    assert (await other.subscribe(stream))["ok"] is True
    await db(ItemFactory)(project=project, title="before")
    assert (await item_event(client))["data"]["title"] == "before"
    assert (await item_event(other))["data"]["title"] == "before"

    await db(change)(member, group)
    gone = {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    assert await client.receive_until("unsubscribed", timeout=1.0) == gone
    if bystander_loses_access:
        assert await other.receive_until("unsubscribed", timeout=1.0) == gone

    await db(ItemFactory)(project=project, title="after")
    if not bystander_loses_access:  # the change reached only the user who left
        assert (await item_event(other))["data"]["title"] == "after"
    assert await client.nothing_more(0.5)  # not even a presence event of the stream
    assert await no_item_event(other, 0.3)
    await client.close()
    await other.close()


async def test_the_organization_stream_shows_members_no_more_of_a_project_than_rest_would():
    """Every member reads `tenant:<org>`, but only the project's own people may see it: the
    organization-wide event names the project by id, the project's stream carries the rest."""
    from board.membership import create_project

    from .factories import OrganizationFactory

    organization = await db(OrganizationFactory)()
    owner, colleague = await db(UserFactory)(), await db(UserFactory)()
    await db(organization.members.add)(owner, colleague)
    watcher = await client_for(colleague)
    assert (await watcher.subscribe(f"tenant:{organization.pk}"))["ok"]
    project = await db(create_project)(organization=organization, name="Secret", owner=owner)
    frame = await watcher.receive_until("event")
    assert frame["type"] == "v1:project.created"
    assert frame["data"] == {"id": project.pk, "organization": organization.pk}
    mine = await client_for(owner)
    assert (await mine.subscribe(f"project:{project.pk}", since=0))["ok"]
    full = await item_event(mine)  # the project's own stream: everything its serializer gives
    assert full["data"]["name"] == "Secret"
    await watcher.close()
    await mine.close()


async def test_a_client_event_carries_only_what_its_policy_lets_through():
    """The demo's typing indicator says which field, nothing else: a client cannot make
    others show a name or markup it sent."""
    owner, member, project, watcher, sender = await owner_and_member_on_a_project()
    stream = f"project:{project.pk}"
    spoof = {"field": "title", "user": {"id": owner.pk, "name": "CEO"}, "text": "<img>"}
    assert (await sender.request("publish", stream=stream, type=TYPING, data=spoof))["ok"]
    typing = await watcher.receive_until("event")
    assert typing["data"] == {"field": "title", "expiresIn": 3000}
    assert typing["from"]["user"] == member.pk
    refused = await sender.request(
        "publish", stream=stream, type="v1:typing.stopped", data={"field": ["x"]}
    )
    assert refused["error"]["code"] == "event_not_allowed"
    assert "'field'" in refused["error"]["message"]
    assert await watcher.nothing_more(0.3)
    await watcher.close()
    await sender.close()


async def test_a_cleaner_that_fails_or_returns_no_json_is_answered_and_the_socket_goes_on():
    import datetime

    from realtime.policies import StreamPolicy, stream_kinds

    class Careless(StreamPolicy):
        client_events = ("v1:note.sent",)

        def authorize(self, user, key):
            return True

        def clean_client_event(self, user, stream, event_type, data):
            if data.get("as") == "date":
                return {"at": datetime.date(2026, 1, 1)}
            if data.get("as") == "big":
                return {"pad": "x" * 5000}
            if data.get("as") == "nan":  # json refuses it with ValueError: still our bug
                return {"at": float("nan")}
            return data["missing"]  # KeyError: a bug in the host's cleaner

    stream_kinds.register("careless", Careless)
    try:
        client = await client_for(await db(UserFactory)())
        for data, code in (
            ({}, "internal_error"),
            ({"as": "date"}, "internal_error"),
            ({"as": "big"}, "event_not_allowed"),
            ({"as": "nan"}, "internal_error"),
        ):
            reply = await client.request(
                "publish", stream="careless:1", type="v1:note.sent", data=data
            )
            assert reply["ref"] is not None
            assert reply["error"]["code"] == code, (data, reply)
        await client.send({"op": "ping", "ref": "alive"})
        assert (await client.receive_until("pong"))["ref"] == "alive"
        await client.close()
    finally:
        stream_kinds.unregister("careless")


async def test_a_permission_change_decides_all_of_a_sockets_streams_together(monkeypatch):
    from realtime.policies import ObjectPolicy

    reader: Any = await db(UserFactory)()
    projects = [await db(ProjectFactory)() for _ in range(10)]
    for project in projects:
        await db(add_member)(project, reader)
    client = await client_for(reader)
    for project in projects:
        assert (await client.subscribe(f"project:{project.pk}"))["ok"] is True
    one_by_one: list[str] = []
    together: list[list[str]] = []
    original_get, original_many = ObjectPolicy.get_object, ObjectPolicy.access_many

    def get_object(self: Any, key: str) -> Any:
        one_by_one.append(key)
        return original_get(self, key)

    def access_many(self: Any, user: Any, kind: str, keys: Any) -> Any:
        together.append(list(keys))
        return original_many(self, user, kind, keys)

    monkeypatch.setattr(ObjectPolicy, "get_object", get_object)
    monkeypatch.setattr(ObjectPolicy, "access_many", access_many)
    await db(remove_member)(projects[3], reader)
    gone = {"op": "unsubscribed", "stream": f"project:{projects[3].pk}", "reason": "forbidden"}
    assert await client.receive_until("unsubscribed", timeout=1.0) == gone
    assert together == [[str(p.pk) for p in projects]]  # one decision for all ten
    assert one_by_one == []  # no object read key by key
    # The nine others are still live, and the revoked one sends nothing more.
    for n, project in enumerate(projects):
        await db(ItemFactory)(project=project, title=f"after {n}")
    titles = {(await item_event(client))["data"]["title"] for _ in range(9)}
    assert titles == {f"after {n}" for n in range(10) if n != 3}
    assert await no_item_event(client, 0.5)
    await client.close()


def slow_first_leave(other: dict[str, Any]) -> Any:
    """Connection hooks whose first `unsubscribed` for a refusal stands in for a slow leave (a
    Redis round trip in production): meanwhile it commits an item titled "after the decision"
    on `other[stream]` (a project) and waits 0.3 s, then sets `done`."""
    from realtime import hooks
    from realtime.testing import flush

    class SlowLeave(hooks.ConnectionHooks):
        waited = False
        done = asyncio.Event()

        async def unsubscribed(self, connection: Any, stream: str, policy: Any, reason: str):
            if reason == "forbidden" and not self.waited:
                self.waited = True
                await db(ItemFactory)(project=other[stream], title="after the decision")
                await db(flush)()
                await asyncio.sleep(0.3)
                self.done.set()

    return SlowLeave()


def remove_from_both(first: Any, second: Any, user: Any) -> None:
    """Take `user` out of both projects in one transaction: one decision refuses both."""
    from django.db import transaction

    with transaction.atomic():
        remove_member(first, user)
        remove_member(second, user)


async def test_streams_revoked_together_stop_together_while_the_first_ones_leave_is_awaited():
    """Both of a socket's streams are refused in one decision. The leave of the first one
    awaits (here a hook that commits an event on the other stream meanwhile): the other
    stream must not deliver it."""
    from realtime import hooks

    reader: Any = await db(UserFactory)()
    first, second = await db(ProjectFactory)(), await db(ProjectFactory)()
    for project in (first, second):
        await db(add_member)(project, reader)
    client = await client_for(reader)
    streams = {f"project:{first.pk}": second, f"project:{second.pk}": first}
    for stream in streams:
        assert (await client.subscribe(stream))["ok"] is True
    slow = slow_first_leave(streams)
    hooks.register_hooks(slow)
    try:
        await db(remove_from_both)(first, second, reader)
        frames = []
        while len([f for f in frames if f.get("op") == "unsubscribed"]) < 2:
            frames.append(await client.receive(timeout=5))
        await asyncio.wait_for(slow.done.wait(), 5)  # the leaves are done
        assert await no_item_event(client, 0.5)
    finally:
        hooks.unregister_hooks(slow)
    assert slow.waited
    titles = [f["data"].get("title") for f in frames if f.get("op") == "event"]
    assert "after the decision" not in titles
    await client.close()


async def test_a_decision_asked_for_with_the_users_id_as_text_reaches_the_socket():
    """`permissions_changed(["7"])` for user 7 (ids as a form or a message carries them):
    the hub keys its user listeners by text, as messages carry non-integer ids."""
    import realtime
    from realtime.testing import flush

    reader: Any = await db(UserFactory)()
    project = await db(ProjectFactory)()
    await db(add_member)(project, reader)
    client = await client_for(reader)
    stream = f"project:{project.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    # Taken away without a signal (a raw delete), then told by hand, with the id as text.
    from guardian.models import UserObjectPermission

    await db(lambda: UserObjectPermission.objects.filter(user=reader)._raw_delete("default"))()
    await db(lambda: realtime.permissions_changed([str(reader.pk)]))()
    await db(flush)()
    gone = await client.receive_until("unsubscribed", timeout=2.0)
    assert gone == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    await client.close()
