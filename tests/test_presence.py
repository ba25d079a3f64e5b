"""Presence: one member per user across tabs, joins and leaves announced once, TTL and sweep,
typing throttle and sender exclusion, signals, REST with authorization and ETag, admin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client, override_settings

from board.membership import add_member
from presence.backends import Change
from presence.signals import presence_joined, presence_left
from presence.tracker import get_backend, iso, sweep
from realtime.hooks import ConnectionHooks
from realtime.testing import RealtimeClient, session_for

from .conftest import redis_names
from .factories import OrganizationFactory, ProjectFactory, UserFactory

db = sync_to_async


def backend_settings() -> dict:
    """A fresh backend of the kind the run uses: Redis under REDIS_URL (own key prefix)."""
    if os.environ.get("REDIS_URL"):
        return {
            "BACKEND": "presence.backends.redis.RedisBackend",
            "CONFIG": {"url": os.environ["REDIS_URL"], "prefix": redis_names()},
        }
    return {
        "BACKEND": "presence.backends.memory.MemoryBackend",
        "CONFIG": {"run": uuid.uuid4().hex},
    }


@pytest.fixture
def fresh_presence():
    with override_settings(PRESENCE=backend_settings()):
        yield


async def tab(user) -> RealtimeClient:
    client = RealtimeClient(session_key=await db(session_for)(user))
    await client.connect()
    return client


async def next_event(client: RealtimeClient, type_: str, timeout: float = 5) -> dict:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.receive(timeout)
            if frame.get("op") == "event" and frame.get("type") == type_:
                return frame


async def no_event(client: RealtimeClient, prefix: str, wait: float = 0.5) -> bool:
    """Whether no event whose type starts with `prefix` arrives within `wait` seconds."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if await client.communicator.receive_nothing(left):
            return True
        frame = await client.receive()
        if frame.get("op") == "event" and frame["type"].startswith(prefix):
            return False
    return True


async def project_with(*members):
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    for user in members:
        await db(add_member)(project, user)
    return owner, project, f"project:{project.pk}"


@pytest.fixture
def signals():
    seen: list[tuple[str, str, str, str]] = []

    def joined(sender, stream, user_id, **kwargs):
        seen.append(("joined", stream, user_id, ""))

    def left(sender, stream, user_id, reason, **kwargs):
        seen.append(("left", stream, user_id, reason))

    presence_joined.connect(joined, weak=False)
    presence_left.connect(left, weak=False)
    yield seen
    presence_joined.disconnect(joined)
    presence_left.disconnect(left)


def told(signals: list[tuple[str, str, str, str]], user: Any) -> list[tuple[str, str]]:
    """The (kind, reason) of the presence signals about `user` (a user, or its id as text)."""
    who = user if isinstance(user, str) else str(user.pk)
    return [(kind, reason) for kind, _stream, user_id, reason in signals if user_id == who]


# -- backends -------------------------------------------------------------------------------


def make_backend(kind: str):
    """A fresh backend: Redis (own key prefix; skipped without REDIS_URL) or in-memory."""
    if kind == "redis":
        from .conftest import need

        need(bool(os.environ.get("REDIS_URL")), "REDIS_URL is not set")
        from presence.backends.redis import RedisBackend

        return RedisBackend(url=os.environ["REDIS_URL"], prefix=redis_names())
    from presence.backends.memory import MemoryBackend

    return MemoryBackend()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_backend_counts_users_not_connections(kind):
    backend = make_backend(kind)
    now = time.time()
    s = "project:1"
    assert await backend.join(s, "7", "c1", "n1", now + 30, now) is True
    assert await backend.join(s, "7", "c2", "n1", now + 30, now + 1) is False  # second tab
    assert await backend.join(s, "7", "c1", "n1", now + 40, now + 2) is False  # refresh
    assert await backend.join(s, "8", "c3", "n2", now + 5, now + 3) is True
    assert await backend.members(s) == {"7": now, "8": now + 3}
    assert await backend.leave(s, "7", "c1") is False  # one tab left
    assert await backend.leave(s, "7", "c1") is False  # twice: nothing
    assert sorted(e.connection_id for e in await backend.entries()) == ["c2", "c3"]
    # c3 (user 8) expires; two sweepers race: the leave is reported once, with the since of
    # the presence it ends.
    first, second = await asyncio.gather(backend.expire(now + 10), backend.expire(now + 10))
    assert first + second == [Change(s, "8", now + 3)]
    assert await backend.members(s) == {"7": now}
    # A swept entry comes back with a refresh (a node that stalled), as a new join.
    assert await backend.refresh([(s, "8", "c3")], "n2", now + 60, now + 11) == [
        Change(s, "8", now + 11)
    ]
    assert await backend.refresh([(s, "8", "c3")], "n2", now + 70, now + 12) == []
    assert await backend.leave(s, "7", "c2") == now  # the last tab: its presence's since
    assert await backend.leave(s, "8", "c3") == now + 11
    assert await backend.members(s) == {}
    assert await backend.entries() == []
    await backend.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_user_id_with_a_bar_expires_as_that_user(kind):
    # A string primary key may hold the "|" that the Redis backend puts between user and
    # connection ids (connection ids are hex, so the user is what comes before the last one).
    backend = make_backend(kind)
    now, s = time.time(), "project:1"
    assert await backend.join(s, "ops|bob", "c1", "n1", now + 0.1, now) is True
    assert [(e.user_id, e.connection_id) for e in await backend.entries()] == [("ops|bob", "c1")]
    assert await backend.expire(now + 1) == [Change(s, "ops|bob", now)]
    assert await backend.members(s) == {}
    await backend.close()


@pytest.mark.asyncio
async def test_closing_the_redis_backend_closes_its_connections():
    from .conftest import need

    need(bool(os.environ.get("REDIS_URL")), "REDIS_URL is not set")
    from presence.backends.redis import RedisBackend

    backend = RedisBackend(url=os.environ["REDIS_URL"], prefix=redis_names())
    await backend.members("project:1")
    pool = backend._client().connection_pool
    connections = [*pool._available_connections, *pool._in_use_connections]
    assert connections
    assert all(c.is_connected for c in connections)
    await backend.close()
    assert not any(c.is_connected for c in connections)  # not left for the GC to close


# -- over the WebSocket -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_two_tabs_are_one_member_one_join_and_one_leave(fresh_presence, signals):
    alice, bob = await db(UserFactory)(username="alice-p"), await db(UserFactory)(username="bob-p")
    _owner, _project, stream = await project_with(alice, bob)
    watcher = await tab(bob)
    reply = await watcher.subscribe(stream)
    assert [m["user"]["username"] for m in reply["data"]["presence"]] == ["bob-p"]

    first = await tab(alice)
    reply = await first.subscribe(stream)
    assert [m["user"]["username"] for m in reply["data"]["presence"]] == ["bob-p", "alice-p"]
    joined = await next_event(watcher, "v1:presence.joined")
    assert joined["data"]["user"] == {"id": alice.pk, "username": "alice-p", "name": "alice-p"}
    assert "seq" not in joined

    second = await tab(alice)
    reply = await second.subscribe(stream)
    assert [m["user"]["id"] for m in reply["data"]["presence"]] == [bob.pk, alice.pk]  # once
    assert await no_event(watcher, "v1:presence.")  # a second tab is no join

    await first.close()
    assert await no_event(watcher, "v1:presence.")  # one tab of two closed: no leave
    await second.close()
    left = await next_event(watcher, "v1:presence.left")
    # `since`: the presence this ends, as the `joined` gave it.
    assert left["data"] == {
        "user": {"id": alice.pk},
        "reason": "disconnect",
        "since": joined["data"]["since"],
    }
    assert await no_event(watcher, "v1:presence.")
    await watcher.close()
    await asyncio.sleep(0.1)
    a, b = str(alice.pk), str(bob.pk)
    assert signals == [
        ("joined", stream, b, ""),
        ("joined", stream, a, ""),
        ("left", stream, a, "disconnect"),
        ("left", stream, b, "disconnect"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_unsubscribe_and_revocation_leave_and_streams_without_presence_track_nothing(
    fresh_presence,
):
    alice, bob = await db(UserFactory)(), await db(UserFactory)()
    _owner, project, stream = await project_with(alice, bob)
    watcher = await tab(bob)
    await watcher.subscribe(stream)
    socket = await tab(alice)
    await socket.subscribe(stream)
    await next_event(watcher, "v1:presence.joined")
    await socket.request("unsubscribe", stream=stream)
    left = await next_event(watcher, "v1:presence.left")
    assert left["data"]["reason"] == "unsubscribe"

    await socket.subscribe(stream)
    await next_event(watcher, "v1:presence.joined")
    from board.membership import remove_member

    await db(remove_member)(project, alice)  # revoked: the subscription ends, so does presence
    left = await next_event(watcher, "v1:presence.left")
    assert left["data"]["user"] == {"id": alice.pk}
    assert left["data"]["reason"] == "forbidden"
    assert await get_backend().members(stream) == {str(bob.pk): pytest.approx(time.time(), abs=60)}

    organization = await db(OrganizationFactory)()
    await db(organization.members.add)(alice)
    reply = await socket.subscribe(f"tenant:{organization.pk}")  # presence off for tenants
    assert "presence" not in reply["data"]
    assert await get_backend().members(f"tenant:{organization.pk}") == {}
    await socket.close()
    await watcher.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_typing_goes_to_the_others_throttled_with_expiry(fresh_presence):
    alice, bob = await db(UserFactory)(), await db(UserFactory)()
    _owner, _project, stream = await project_with(alice, bob)
    bob_tab = await tab(bob)
    await bob_tab.subscribe(stream)
    alice_tab, alice_other = await tab(alice), await tab(alice)
    await alice_tab.subscribe(stream)
    await alice_other.subscribe(stream)

    reply = await alice_tab.request(
        "publish", stream=stream, type="v1:typing.started", data={"field": "title"}
    )
    assert reply["ok"] is True
    assert "throttled" not in reply["data"]
    typing = await next_event(bob_tab, "v1:typing.started")
    assert typing["data"] == {"field": "title", "expiresIn": 3000}
    assert typing["from"]["user"] == alice.pk
    # Within a second: accepted, not forwarded.
    again = await alice_other.request("publish", stream=stream, type="v1:typing.started", data={})
    assert again["data"] == {"throttled": True}
    assert await no_event(bob_tab, "v1:typing.", wait=0.3)
    stopped = await alice_tab.request("publish", stream=stream, type="v1:typing.stopped", data={})
    assert stopped["ok"] is True
    assert (await next_event(bob_tab, "v1:typing.stopped"))["from"]["user"] == alice.pk
    # A `stopped` does not reset the interval, and one with no `started` before it is held
    # back: alternating the two forwards nothing more within the interval.
    for kind in ("started", "stopped", "started", "stopped"):
        held = await alice_tab.request("publish", stream=stream, type=f"v1:typing.{kind}", data={})
        assert held["data"] == {"throttled": True}, kind
    assert await no_event(bob_tab, "v1:typing.", wait=0.3)
    # Never to the sender's own tabs.
    assert await no_event(alice_tab, "v1:typing.", wait=0.2)
    assert await no_event(alice_other, "v1:typing.", wait=0.2)
    # After the interval, typing is forwarded again.
    await asyncio.sleep(1.05)
    await alice_tab.request("publish", stream=stream, type="v1:typing.started", data={})
    assert (await next_event(bob_tab, "v1:typing.started"))["data"] == {"expiresIn": 3000}
    for client in (bob_tab, alice_tab, alice_other):
        await client.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_entries_of_a_dead_node_expire_and_the_leave_is_announced_once(
    fresh_presence, signals
):
    bob = await db(UserFactory)()
    _owner, _project, stream = await project_with(bob)
    watcher = await tab(bob)
    await watcher.subscribe(stream)
    # A user present through a node that died: its entry is not refreshed any more.
    now = time.time()
    await get_backend().join(stream, "424242", "deadbeef", "dead-node", now + 0.2, now)
    await asyncio.sleep(0.3)
    results = await asyncio.gather(sweep(), sweep())
    assert sum(len(r) for r in results) == 1
    left = await next_event(watcher, "v1:presence.left")
    assert left["data"] == {"user": {"id": 424242}, "reason": "expired", "since": iso(now)}
    assert await no_event(watcher, "v1:presence.", wait=0.3)
    assert ("left", stream, "424242", "expired") in signals
    await watcher.close()


# -- REST and admin ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_rest_list_is_authorized_like_subscribing_and_has_an_etag(fresh_presence):
    alice, carol = UserFactory(username="alice-r"), UserFactory(username="carol-r")
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    add_member(project, alice)
    stream = f"project:{project.pk}"
    now = time.time()
    async_to_sync(get_backend().join)(stream, str(alice.pk), "c1", "n", now + 30, now)
    client = Client()
    client.force_login(alice)
    response = client.get(f"/api/presence/{stream}/")
    assert response.status_code == 200
    body = response.json()
    assert body["stream"] == stream
    assert [m["user"]["username"] for m in body["members"]] == ["alice-r"]
    unchanged = client.get(f"/api/presence/{stream}/", HTTP_IF_NONE_MATCH=response["ETag"])
    assert unchanged.status_code == 304
    assert not unchanged.has_header("Content-Type")  # a 304 has no body to name the type of
    assert unchanged["ETag"] == response["ETag"]
    async_to_sync(get_backend().join)(stream, str(owner.pk), "c2", "n", now + 30, now + 1)
    assert (
        client.get(f"/api/presence/{stream}/", HTTP_IF_NONE_MATCH=response["ETag"]).status_code
        == 200
    )

    outsider = Client()
    outsider.force_login(carol)
    assert outsider.get(f"/api/presence/{stream}/").status_code == 403
    assert outsider.get("/api/presence/project:999999/").status_code == 403  # missing alike
    assert Client().get(f"/api/presence/{stream}/").status_code == 403
    assert client.get("/api/presence/nope/").status_code == 400
    assert client.get("/api/presence/planet:1/").status_code == 404
    assert client.post(f"/api/presence/{stream}/").status_code == 405
    organization = OrganizationFactory()
    organization.members.add(alice)
    assert client.get(f"/api/presence/tenant:{organization.pk}/").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_admin_page_lists_streams_users_and_connections(fresh_presence):
    staff = UserFactory(username="staff-p", is_staff=True, is_superuser=True)
    now = time.time()
    async_to_sync(get_backend().join)(
        "project:77", str(staff.pk), "conn-abc", "node-1", now + 30, now
    )
    client = Client()
    client.force_login(staff)
    page = client.get("/admin/presence/presence/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "project:77" in text
    assert "conn-abc" in text
    assert "node-1" in text
    assert "staff-p" in text
    assert (
        client.get("/admin/presence/presence/", {"q": "project:78"})
        .content.decode()
        .count("conn-abc")
        == 0
    )
    plain = UserFactory(is_staff=True)
    other = Client()
    other.force_login(plain)
    assert other.get("/admin/presence/presence/").status_code == 403


@pytest.mark.asyncio
async def test_the_admin_page_leaves_the_servers_presence_connections_alone():
    """Under ASGI the admin's sync view runs in a thread of the server's loop; its read of
    the entries must not close the connections that loop's sockets use."""
    from .conftest import need

    need(bool(os.environ.get("REDIS_URL")), "REDIS_URL is not set")
    from presence.admin import _entries

    with override_settings(PRESENCE=backend_settings()):
        backend = get_backend()
        await backend.members("project:1")  # this loop's client, as the server's sockets use
        loop = asyncio.get_running_loop()
        client = backend._clients[loop]
        pool = client.connection_pool
        assert await sync_to_async(_entries)() == []
        assert backend._clients.get(loop) is client
        assert all(c.is_connected for c in pool._available_connections)
        assert await backend.members("project:1") == {}
        await backend.close()


def test_system_checks():
    from presence.checks import check_backend

    with override_settings(PRESENCE={"BACKEND": "no.such.Backend"}):
        assert [m.id for m in check_backend()] == ["presence.E001"]
    with override_settings(PRESENCE={"BACKEND": "presence.conf.AppSettings"}):
        assert [m.id for m in check_backend()] == ["presence.E002"]
    with override_settings(PRESENCE={"TTL": 10, "REFRESH_INTERVAL": 10}, DEBUG=True):
        assert [m.id for m in check_backend()] == ["presence.E003"]
    with override_settings(
        PRESENCE={"BACKEND": "presence.backends.memory.MemoryBackend"}, DEBUG=False
    ):
        assert [m.id for m in check_backend()] == ["presence.W001"]
    # Intervals of zero or less (or not numbers) would make the background loops spin.
    for bad in (
        {"TTL": 0},
        {"TTL": -5, "REFRESH_INTERVAL": 1},
        {"REFRESH_INTERVAL": 0},
        {"REFRESH_INTERVAL": -1},
        {"SWEEP_INTERVAL": 0},
        {"SWEEP_INTERVAL": "soon"},
        {"TYPING_INTERVAL": -1},
        {"TYPING_EXPIRES_MS": -1},
    ):
        with override_settings(PRESENCE=bad, DEBUG=True):
            assert [m.id for m in check_backend()] == ["presence.E004"], bad


@pytest.mark.django_db(transaction=True)
def test_lists_are_bounded_with_the_total_and_presence_can_be_switched_off():
    users = [UserFactory() for _ in range(5)]
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    stream = f"project:{project.pk}"
    now = time.time()
    config = backend_settings()
    with override_settings(PRESENCE={**config, "MAX_LISTED": 3}):
        for n, user in enumerate([owner, *users]):
            async_to_sync(get_backend().join)(stream, str(user.pk), f"c{n}", "n", now + 30, now + n)
        client = Client()
        client.force_login(owner)
        body = client.get(f"/api/presence/{stream}/").json()
        assert body["total"] == 6
        assert [m["user"]["id"] for m in body["members"]] == [owner.pk, users[0].pk, users[1].pk]
        # The user asking is listed even past the bound, in place of the newest of the others.
        add_member(project, users[4])
        newest = Client()
        newest.force_login(users[4])
        body = newest.get(f"/api/presence/{stream}/").json()
        assert body["total"] == 6
        assert [m["user"]["id"] for m in body["members"]] == [owner.pk, users[0].pk, users[4].pk]
    with override_settings(PRESENCE={**config, "ENABLED": False}):
        client = Client()
        client.force_login(owner)
        assert client.get(f"/api/presence/{stream}/").status_code == 404


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_with_presence_off_subscribing_tracks_nobody():
    alice = await db(UserFactory)()
    _owner, _project, stream = await project_with(alice)
    with override_settings(PRESENCE={**backend_settings(), "ENABLED": False}):
        socket = await tab(alice)
        reply = await socket.subscribe(stream)
        assert "presence" not in reply["data"]
        assert await get_backend().members(stream) == {}
        await socket.close()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_user_who_left_during_a_refresh_is_not_written_back_by_it(private_redis, signals):
    """The refresh writes many entries in one pipeline while others' commands run between:
    a leave that lands before its entry's write must not be undone by it."""
    import types

    from presence.tracker import tracker

    def connection(user_pk: int, connection_id: str):
        user = types.SimpleNamespace(pk=user_pk, get_username=lambda: f"u{user_pk}")
        return types.SimpleNamespace(user=user, connection_id=connection_id)

    policy = types.SimpleNamespace(presence=True)
    settings = {
        "BACKEND": "presence.backends.redis.RedisBackend",
        "CONFIG": {"url": private_redis.url, "prefix": f"t-{uuid.uuid4().hex}"},
        "TTL": 30.0,
        "REFRESH_INTERVAL": 0.01,  # a refresh is nearly always under way
        "SWEEP_INTERVAL": 60.0,
    }
    with override_settings(PRESENCE=settings):
        try:
            for n in range(500):  # many sockets on this node: a refresh takes a while
                await tracker.subscribed(connection(1, f"filler{n:05d}"), "project:1", policy)
            ghosts = 0
            for attempt in range(10):
                alice = connection(2, f"zz{attempt}")  # sorts last: written last by a refresh
                await tracker.subscribed(alice, "project:9", policy)
                await asyncio.sleep(0.05)
                await tracker.unsubscribed(alice, "project:9", policy, "disconnect")
                await asyncio.sleep(0.3)
                if "2" in await get_backend().members("project:9"):
                    ghosts += 1
                    await get_backend().leave("project:9", "2", alice.connection_id)
        finally:
            for state in list(tracker._loops.values()):
                for task in state.tasks:
                    task.cancel()
            tracker._loops.clear()
            await get_backend().close()
    assert ghosts == 0, f"{ghosts} of 10 times the user who closed their only tab stayed present"
    alice = [(kind, stream) for kind, stream, user, _reason in signals if user == "2"]
    assert alice == [("joined", "project:9"), ("left", "project:9")] * 10  # and no join again


class HeldRefreshBackend:
    """The memory backend, with a refresh that stops after reading its entries until the
    test lets it write (`held` is set while one waits; `release` lets them go)."""

    held: asyncio.Event
    release: asyncio.Event

    def __new__(cls, **config):
        from presence.backends.memory import MemoryBackend

        class Held(MemoryBackend):
            async def refresh(self, entries, node, expires_at, now):
                taken = list(entries)  # what the tracker handed over, as a pipeline holds it
                cls.held.set()
                await cls.release.wait()
                return await super().refresh(taken, node, expires_at, now)

        return Held(**config)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_leave_waits_for_a_refresh_under_way_instead_of_being_undone_by_it(signals):
    import types

    from presence.tracker import tracker

    HeldRefreshBackend.held = asyncio.Event()
    HeldRefreshBackend.release = asyncio.Event()
    user = types.SimpleNamespace(pk=2, get_username=lambda: "u2")
    alice = types.SimpleNamespace(user=user, connection_id="c1")
    policy = types.SimpleNamespace(presence=True)
    settings = {
        "BACKEND": "tests.test_presence.HeldRefreshBackend",
        "CONFIG": {"run": uuid.uuid4().hex},
        "TTL": 30.0,
        "REFRESH_INTERVAL": 0.01,
        "SWEEP_INTERVAL": 60.0,
    }
    with override_settings(PRESENCE=settings):
        try:
            await tracker.subscribed(alice, "project:9", policy)
            await asyncio.wait_for(HeldRefreshBackend.held.wait(), 5)  # holding alice's entry
            leaving = asyncio.ensure_future(
                tracker.unsubscribed(alice, "project:9", policy, "disconnect")
            )
            await asyncio.sleep(0.1)
            assert not leaving.done()  # it waits for the refresh, rather than going first
            HeldRefreshBackend.release.set()
            await asyncio.wait_for(leaving, 5)
            await asyncio.sleep(0.1)  # later refreshes run (released) without alice
            assert "2" not in await get_backend().members("project:9")
        finally:
            HeldRefreshBackend.release.set()
            for state in list(tracker._loops.values()):
                for task in state.tasks:
                    task.cancel()
            tracker._loops.clear()
    assert [(kind, user) for kind, _stream, user, _r in signals] == [
        ("joined", "2"),
        ("left", "2"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_stuck_layer_costs_the_announcements_never_the_join_or_leave(
    fresh_presence, signals, settings, monkeypatch
):
    from channels.layers import get_channel_layer

    settings.REALTIME = {"PUBLISH_TIMEOUT": 0.2}
    alice = await db(UserFactory)(username="alice-s")
    _owner, _project, stream = await project_with(alice)
    layer = get_channel_layer()
    original = layer.group_send

    async def stuck(group, message):
        if message.get("ephemeral"):
            await asyncio.sleep(3600)  # presence diffs hang (Redis paused)
        await original(group, message)

    monkeypatch.setattr(layer, "group_send", stuck)
    client = await tab(alice)
    reply = await client.subscribe(stream)
    assert reply["ok"] is True
    assert [m["user"]["username"] for m in reply["data"]["presence"]] == ["alice-s"]
    await client.close()
    await asyncio.sleep(0.5)
    assert [change[0] for change in signals] == ["joined", "left"]
    assert await get_backend().members(stream) == {}


def stop_tracker() -> None:
    from presence.tracker import tracker

    for loop, state in list(tracker._loops.items()):
        for task in state.tasks:
            if not loop.is_closed():  # left by a test that failed before it stopped them
                task.cancel()
    tracker._loops.clear()


def fast_presence() -> dict:
    return {
        **backend_settings(),
        "TTL": 0.6,
        "REFRESH_INTERVAL": 0.2,
        "SWEEP_INTERVAL": 0.1,
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_socket_cut_off_during_a_slow_disconnect_leaves_every_stream(
    settings, monkeypatch, signals
):
    from channels.layers import get_channel_layer

    settings.REALTIME = {"PUBLISH_TIMEOUT": 0.6}
    with override_settings(PRESENCE=fast_presence()):
        stop_tracker()
        try:
            alice = await db(UserFactory)()
            streams = []
            for _ in range(3):
                _owner, _project, stream = await project_with(alice)
                streams.append(stream)
            client = await tab(alice)
            for stream in streams:
                assert (await client.subscribe(stream))["ok"]
            layer = get_channel_layer()
            original = layer.group_send
            stuck = True

            async def group_send(group, message):
                if stuck and message.get("ephemeral"):
                    await asyncio.sleep(3600)  # the announcements hang (Redis paused)
                await original(group, message)

            monkeypatch.setattr(layer, "group_send", group_send)
            # The server gives the app 1 s after the client left, then cancels it: three
            # announcements of 0.6 s each, one after the other, would not fit.
            await client.communicator.disconnect(timeout=1)
            stuck = False
            await asyncio.sleep(2.0)  # > 3 TTLs
            for stream in streams:
                assert str(alice.pk) not in await get_backend().members(stream), stream
        finally:
            stop_tracker()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_consumer_cancelled_before_its_disconnect_leaves():
    from realtime.fanout import get_hub
    from realtime.models import Connection

    with override_settings(PRESENCE=fast_presence()):
        stop_tracker()
        try:
            alice = await db(UserFactory)()
            _owner, _project, stream = await project_with(alice)
            client = await tab(alice)
            assert (await client.subscribe(stream))["ok"]
            client.communicator.future.cancel()  # no websocket.disconnect ever comes
            await asyncio.sleep(2.0)
            assert str(alice.pk) not in await get_backend().members(stream)
            assert not get_hub().members.get(stream)
            assert not await db(Connection.objects.filter(user=alice).exists)()
        finally:
            stop_tracker()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_closing_connection_is_not_refreshed_and_expires(signals):
    import types

    from presence.tracker import tracker

    user = types.SimpleNamespace(pk=3, get_username=lambda: "u3")
    alice = types.SimpleNamespace(user=user, connection_id="c3", closing=False)
    policy = types.SimpleNamespace(presence=True)
    with override_settings(PRESENCE=fast_presence()):
        stop_tracker()
        try:
            await tracker.subscribed(alice, "project:9", policy)
            await asyncio.sleep(1.0)  # refreshed past the TTL while it is open
            assert "3" in await get_backend().members("project:9")
            alice.closing = True  # its leaves never run (cut off, or they failed)
            await asyncio.sleep(1.5)
            assert "3" not in await get_backend().members("project:9")
        finally:
            stop_tracker()
    assert [(kind, reason) for kind, _stream, _user, reason in signals] == [
        ("joined", ""),
        ("left", "expired"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_join_announced_by_a_refresh_after_a_stall_shows_the_user():
    from presence.tracker import _node

    presence = {**backend_settings(), "TTL": 30.0, "REFRESH_INTERVAL": 0.3, "SWEEP_INTERVAL": 60.0}
    with override_settings(PRESENCE=presence):
        stop_tracker()
        try:
            alice = await db(UserFactory)(username="alice-stall")
            bob = await db(UserFactory)(username="bob-stall")
            _owner, _project, stream = await project_with(alice, bob)
            watcher = await tab(bob)
            await watcher.subscribe(stream)
            socket = RealtimeClient(session_key=await db(session_for)(alice))
            welcome = await socket.connect()
            await socket.subscribe(stream)
            normal = await next_event(watcher, "v1:presence.joined")
            # Alice's entry was not refreshed in time (the node stalled): a sweeper takes it.
            now = time.time()
            await get_backend().join(
                stream, str(alice.pk), welcome["connectionId"], _node(), now - 1, now
            )
            assert len(await sweep()) == 1
            assert (await next_event(watcher, "v1:presence.left"))["data"]["reason"] == "expired"
            again = await next_event(watcher, "v1:presence.joined")  # the refresh puts it back
            assert again["data"]["user"] == normal["data"]["user"]
            assert again["data"]["user"]["username"] == "alice-stall"
            # Her own socket got the sweep's `left` about her, so it gets the `joined` too.
            assert (await next_event(socket, "v1:presence.left"))["data"]["user"]["id"] == alice.pk
            mine = await next_event(socket, "v1:presence.joined")
            assert mine["data"]["user"]["username"] == "alice-stall"
            await watcher.close()
            await socket.close()
        finally:
            stop_tracker()


def faulty_display(user):
    """A USER_SERIALIZER with the mistakes an integrator can make, one per username."""
    import datetime

    if user.username.endswith("-raises"):
        raise RuntimeError("no profile")
    if user.username.endswith("-list"):
        return [user.pk]
    if user.username.endswith("-date"):
        return {"id": user.pk, "joined": datetime.date(2026, 1, 1)}
    return {"username": user.username}  # no `id`: clients match `left` by it


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_failing_user_serializer_shows_the_user_by_id_and_breaks_nothing(caplog):
    presence = {**backend_settings(), "USER_SERIALIZER": "tests.test_presence.faulty_display"}
    with override_settings(PRESENCE=presence):
        names = ["u-raises", "u-list", "u-date", "u-plain"]
        users = [await db(UserFactory)(username=name) for name in names]
        bob = await db(UserFactory)(username="bob-shown")
        _owner, _project, stream = await project_with(bob, *users)
        watcher = await tab(bob)
        await watcher.subscribe(stream)
        sockets = []
        for user in users:
            socket = await tab(user)
            reply = await socket.subscribe(stream)
            assert reply["ok"], reply
            sockets.append(socket)
            joined = await next_event(watcher, "v1:presence.joined")
            expected = (
                {"id": user.pk, "username": user.username}
                if user.username == "u-plain"
                else {"id": user.pk}
            )
            assert joined["data"]["user"] == expected
        latecomer = await tab(bob)
        listed = (await latecomer.subscribe(stream))["data"]["presence"]
        assert [m["user"]["id"] for m in listed] == [bob.pk, *(u.pk for u in users)]
        assert "USER_SERIALIZER" in caplog.text
        client = Client()
        await db(client.force_login)(bob)
        response = await db(client.get)(f"/api/presence/{stream}/")
        assert response.status_code == 200
        assert [m["user"]["id"] for m in response.json()["members"]] == [
            bob.pk,
            *(u.pk for u in users),
        ]
        for socket in [watcher, latecomer, *sockets]:
            await socket.close()


# -- writes whose outcome a node did not learn ---------------------------------------------------


class LostReplyBackend:
    """The backend of `base` whose writes go through but whose reply is lost, as when Redis ran
    the commands and the connection then broke or timed out: each name in `lose` ("join",
    "refresh", "leave") fails that many times after the write."""

    lose: dict[str, int] = {}
    #: Each name here fails that many times before the write instead (Redis unreachable).
    refuse: dict[str, int] = {}
    #: Each name here answers this many seconds after its write (a slow reply).
    slow: dict[str, float] = {}

    def __new__(cls, base: str, **config):
        from django.utils.module_loading import import_string

        def lossy(name):
            async def method(self, *args):
                if cls.refuse.get(name, 0) > 0:
                    cls.refuse[name] -= 1
                    raise ConnectionError(f"{name}: not connected")
                result = await getattr(super(Lossy, self), name)(*args)
                if cls.slow.get(name):
                    await asyncio.sleep(cls.slow[name])
                if cls.lose.get(name, 0) > 0:
                    cls.lose[name] -= 1
                    raise ConnectionError(f"{name}: reply lost")
                return result

            return method

        # Made with type(): mypy cannot take a base class known only at run time.
        Lossy = type(
            "Lossy",
            (import_string(base),),
            {name: lossy(name) for name in ("join", "refresh", "leave")},
        )

        return Lossy(**config)


def lossy_presence(**lose: int) -> dict:
    LostReplyBackend.lose = dict(lose)
    LostReplyBackend.refuse = {}
    LostReplyBackend.slow = {}
    base = backend_settings()
    return {
        "BACKEND": "tests.test_presence.LostReplyBackend",
        "CONFIG": {"base": base["BACKEND"], **base["CONFIG"]},
        "TTL": 30.0,
        "REFRESH_INTERVAL": 0.2,
        "SWEEP_INTERVAL": 60.0,
    }


@contextlib.asynccontextmanager
async def lossy_room(name: str, **presence: Any) -> AsyncIterator[tuple[Any, str, Any]]:
    """Alice and Bob on one project's stream, Bob's tab watching it, with the lossy backend
    (and `presence` settings over it); the tracker is stopped before and after."""
    with override_settings(PRESENCE={**lossy_presence(), **presence}):
        stop_tracker()
        try:
            alice = await db(UserFactory)(username=f"alice-{name}")
            bob = await db(UserFactory)(username=f"bob-{name}")
            _owner, _project, stream = await project_with(alice, bob)
            watcher = await tab(bob)
            await watcher.subscribe(stream)
            yield alice, stream, watcher
        finally:
            stop_tracker()


async def swept_away(stream: str, user, connection_id: str) -> None:
    """The user's entry was not refreshed in time (the node stalled): a sweeper takes it."""
    from presence.tracker import _node

    now = time.time()
    await get_backend().join(stream, str(user.pk), connection_id, _node(), now - 1, now)
    assert len(await sweep()) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_rejoin_written_by_a_refresh_whose_reply_was_lost_is_announced(signals):
    async with lossy_room("lost") as (alice, stream, watcher):
        socket = RealtimeClient(session_key=await db(session_for)(alice))
        welcome = await socket.connect()
        await socket.subscribe(stream)
        await next_event(watcher, "v1:presence.joined")
        LostReplyBackend.lose["refresh"] = 1  # the refresh that puts alice back: no answer
        await swept_away(stream, alice, welcome["connectionId"])
        left = await next_event(watcher, "v1:presence.left")
        assert left["data"]["reason"] == "expired"
        again = await next_event(watcher, "v1:presence.joined", timeout=3)
        assert again["data"]["user"]["username"] == "alice-lost"
        assert again["data"]["since"] > left["data"]["since"]  # a client applies it
        assert str(alice.pk) in await get_backend().members(stream)
        assert await no_event(watcher, "v1:presence.", wait=0.6)  # announced once
        await socket.close()
        assert (await next_event(watcher, "v1:presence.left"))["data"]["user"]["id"] == alice.pk
        await watcher.close()
    assert told(signals, alice) == [
        ("joined", ""),
        ("left", "expired"),
        ("joined", ""),
        ("left", "disconnect"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_join_whose_reply_was_lost_on_subscribe_is_announced_by_the_next_refresh():
    async with lossy_room("lost2") as (alice, stream, watcher):
        LostReplyBackend.lose["join"] = 1
        socket = await tab(alice)
        assert (await socket.subscribe(stream))["ok"]  # written, but not known to be
        assert str(alice.pk) in await get_backend().members(stream)
        joined = await next_event(watcher, "v1:presence.joined", timeout=3)
        assert joined["data"]["user"]["username"] == "alice-lost2"
        assert await no_event(watcher, "v1:presence.", wait=0.6)
        await socket.close()
        await watcher.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_rejoin_whose_display_fields_could_not_be_read_is_announced_later(monkeypatch):
    import presence.tracker

    async with lossy_room("db") as (alice, stream, watcher):
        socket = RealtimeClient(session_key=await db(session_for)(alice))
        welcome = await socket.connect()
        await socket.subscribe(stream)
        await next_event(watcher, "v1:presence.joined")
        original, failures = presence.tracker.display_many, [1]

        def display_many(user_ids):
            if failures:
                failures.pop()
                raise RuntimeError("database unavailable")
            return original(user_ids)

        monkeypatch.setattr(presence.tracker, "display_many", display_many)
        await swept_away(stream, alice, welcome["connectionId"])
        await next_event(watcher, "v1:presence.left")
        again = await next_event(watcher, "v1:presence.joined", timeout=3)
        assert again["data"]["user"]["username"] == "alice-db"
        assert not failures
        await socket.close()
        await watcher.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("ran", [True, False], ids=["reply-lost", "not-run"])
async def test_a_leave_that_raised_is_announced_once_and_only_for_the_last_tab(ran, signals):
    async with lossy_room("gone", SWEEP_INTERVAL=0.1) as (alice, stream, watcher):
        failures = LostReplyBackend.lose if ran else LostReplyBackend.refuse
        first, second = await tab(alice), await tab(alice)
        await first.subscribe(stream)
        await second.subscribe(stream)
        await next_event(watcher, "v1:presence.joined")
        failures["leave"] = 1
        await first.close()  # her other tab is open: no leave, whatever the backend did
        assert await no_event(watcher, "v1:presence.", wait=1.0)
        assert str(alice.pk) in await get_backend().members(stream)
        failures["leave"] = 1
        await second.close()
        left = await next_event(watcher, "v1:presence.left", timeout=3)
        assert left["data"]["user"] == {"id": alice.pk}
        assert left["data"]["reason"] == "expired"  # settled by the sweep
        assert await no_event(watcher, "v1:presence.", wait=1.0)  # once
        assert str(alice.pk) not in await get_backend().members(stream)
        await watcher.close()
    assert told(signals, alice) == [
        ("joined", ""),
        ("left", "expired"),
    ]


class RaisingPolicy:
    """A stream kind with presence whose policy has a bug: it raises."""

    def __new__(cls):
        from realtime.policies import StreamPolicy

        class Raising(StreamPolicy):
            presence = True

            def authorize(self, user, key):
                raise RuntimeError("policy bug")

        return Raising()


@pytest.mark.django_db(transaction=True)
def test_rest_answers_json_when_the_policy_raises_or_the_backend_is_down(caplog):
    from realtime.policies import stream_kinds

    alice = UserFactory()
    project = ProjectFactory(owner=alice)
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    stream_kinds.register("buggy", RaisingPolicy())
    try:
        response = client.get("/api/presence/buggy:1/")  # refused, as a subscribe would be
        assert response.status_code == 403
        assert response.json() == {"detail": "You may not read this stream."}
        assert "policy bug" in caplog.text
    finally:
        stream_kinds.unregister("buggy")
    down = {
        "BACKEND": "presence.backends.redis.RedisBackend",
        "CONFIG": {"url": "redis://127.0.0.1:1/0"},
    }
    with override_settings(PRESENCE=down):
        response = client.get(f"/api/presence/project:{project.pk}/")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Presence is unavailable; retry later."}
    assert "Traceback" not in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_the_admin_page_says_when_it_could_not_read_everything(fresh_presence, monkeypatch):
    import presence.admin

    staff = UserFactory(is_staff=True, is_superuser=True)
    client = Client(raise_request_exception=False)
    client.force_login(staff)
    now = time.time()
    for n in range(3):
        async_to_sync(get_backend().join)(
            f"project:{n}", str(staff.pk), f"c{n}", "n", now + 30, now
        )
    monkeypatch.setattr(presence.admin, "LIMIT", 2)
    # A search among what was read: the page must not pretend it looked at every entry.
    page = client.get("/admin/presence/presence/", {"q": "project:2"})  # not among them
    assert page.status_code == 200
    assert "Only the first entries are shown, and searched." in page.content.decode()
    down = {
        "BACKEND": "presence.backends.redis.RedisBackend",
        "CONFIG": {"url": "redis://127.0.0.1:1/0"},
    }
    with override_settings(PRESENCE=down):
        page = client.get("/admin/presence/presence/")
    assert page.status_code == 200
    assert "The presence backend could not be read" in page.content.decode()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_subscribe_while_the_backend_is_down_makes_the_user_present_when_it_is_back():
    async with lossy_room("down") as (alice, stream, watcher):
        LostReplyBackend.refuse["join"] = 1
        socket = await tab(alice)
        reply = await socket.subscribe(stream)
        assert reply["ok"] is True
        assert "presence" not in reply["data"]
        assert "presenceTotal" not in reply["data"]
        joined = await next_event(watcher, "v1:presence.joined", timeout=3)
        assert joined["data"]["user"]["username"] == "alice-down"
        mine = await next_event(socket, "v1:presence.joined", timeout=3)
        assert mine["data"]["user"]["id"] == alice.pk
        assert await no_event(watcher, "v1:presence.", wait=0.6)
        await socket.close()
        await watcher.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_closing_another_tab_does_not_swallow_the_typing_stopped_of_this_one(fresh_presence):
    alice, bob = await db(UserFactory)(), await db(UserFactory)()
    _owner, _project, stream = await project_with(alice, bob)
    watcher = await tab(bob)
    await watcher.subscribe(stream)
    typing, other = await tab(alice), await tab(alice)
    await typing.subscribe(stream)
    await other.subscribe(stream)
    await typing.request("publish", stream=stream, type="v1:typing.started", data={})
    await next_event(watcher, "v1:typing.started")
    await other.close()
    stopped = await typing.request("publish", stream=stream, type="v1:typing.stopped", data={})
    assert stopped["data"] != {"throttled": True}
    assert (await next_event(watcher, "v1:typing.stopped"))["from"]["user"] == alice.pk
    await typing.close()
    await watcher.close()


@pytest.mark.django_db(transaction=True)
def test_rest_list_takes_a_token_as_drf_views_do(fresh_presence, settings):
    from rest_framework.authtoken.models import Token

    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    stream = f"project:{project.pk}"
    token = Token.objects.create(user=owner)
    response = Client().get(f"/api/presence/{stream}/", HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 200, response.content
    assert response.json()["stream"] == stream
    # Refused credentials: DRF's answer, 403 while the session is the first class...
    bad = Client().get(f"/api/presence/{stream}/", HTTP_AUTHORIZATION="Token " + "0" * 40)
    assert (bad.status_code, bad.json()) == (403, {"detail": "Invalid token."})
    assert not bad.has_header("WWW-Authenticate")
    # ...and 401 with the challenge when the token class comes first.
    settings.REALTIME = {
        "HTTP_AUTHENTICATION_CLASSES": ["rest_framework.authentication.TokenAuthentication"]
    }
    anonymous = Client().get(f"/api/presence/{stream}/")
    assert anonymous.status_code == 401
    assert anonymous["WWW-Authenticate"] == "Token"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_members_many_reads_what_members_reads_for_every_stream(kind, monkeypatch):
    backend = make_backend(kind)
    now = time.time()
    streams = [f"project:{n}" for n in range(7)]
    for n, stream in enumerate(streams[:5]):
        for user in range(n + 1):
            await backend.join(stream, str(user), f"c{user}", "n1", now + 30, now + user)
    if kind == "redis":
        import presence.backends.redis as redis_backend

        monkeypatch.setattr(redis_backend, "_PIPELINE_CHUNK", 3)  # several pipelines
    many = await backend.members_many(streams)
    assert list(many) == streams
    assert many == {stream: await backend.members(stream) for stream in streams}
    assert many["project:4"] == {str(u): now + u for u in range(5)}
    assert many["project:6"] == {}
    await backend.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_refresh_after_a_lost_reply_reads_all_its_streams_in_one_call(monkeypatch):
    from django.utils.module_loading import import_string

    base = import_string(backend_settings()["BACKEND"])  # the class the lossy one derives from
    calls: list[list[str]] = []
    original = base.members_many

    async def members_many(self, streams):
        calls.append(list(streams))
        if len(calls) == 1:
            raise ConnectionError("members: not connected")  # still unsure: looked at again
        return await original(self, streams)

    monkeypatch.setattr(base, "members_many", members_many)
    async with lossy_room("many") as (alice, stream, watcher):
        _owner, _p, second = await project_with(alice)
        LostReplyBackend.lose["join"] = 2
        socket = await tab(alice)
        assert (await socket.subscribe(stream))["ok"]
        assert (await socket.subscribe(second))["ok"]
        joined = await next_event(watcher, "v1:presence.joined", timeout=3)
        assert joined["data"]["user"]["username"] == "alice-many"
        assert len(calls) >= 2, calls  # the first read failed, a later refresh read again
        assert all(sorted(call) == sorted({stream, second}) for call in calls)  # one call each
        await socket.close()
        await watcher.close()


# -- SSE streams are present as sockets are ---------------------------------------------------


class DirectSSE:
    """An SSE stream run as the server runs it (the test client's wrapper would not close
    it), read as text."""

    def __init__(self, user, streams: list[str]) -> None:
        from realtime.cursor import Position
        from realtime.sse import SSEConnection

        self.connection = SSEConnection(user, streams, {s: Position(0, None) for s in streams})
        self.body = self.connection.run([], 5)
        self.text = ""

    async def until(self, needle: str, timeout: float = 5) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while needle not in self.text:
                self.text += await self.body.__anext__()

    async def close(self) -> None:
        await self.body.aclose()


async def sse_of(user, streams: str) -> DirectSSE:
    """An SSE stream of `user`, with its first message (retry:) read."""
    stream = DirectSSE(user, streams.split(","))
    await stream.until("retry:")
    return stream


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_sse_stream_makes_its_user_present_until_it_ends(fresh_presence, signals):
    alice = await db(UserFactory)(username="alice-sse")
    bob = await db(UserFactory)(username="bob-sse")
    _owner, _project, stream = await project_with(alice, bob)
    watcher = await tab(bob)
    await watcher.subscribe(stream)
    reader = await sse_of(alice, stream)
    joined = await next_event(watcher, "v1:presence.joined")
    assert joined["data"]["user"]["username"] == "alice-sse"
    assert str(alice.pk) in await get_backend().members(stream)
    # A socket of hers beside the stream is the same member: no second join, and closing
    # it leaves her present through the stream.
    socket = await tab(alice)
    reply = await socket.subscribe(stream)
    assert [m["user"]["id"] for m in reply["data"]["presence"]] == [bob.pk, alice.pk]
    await socket.close()
    assert await no_event(watcher, "v1:presence.")
    await reader.close()  # the client goes away
    left = await next_event(watcher, "v1:presence.left")
    assert left["data"]["user"] == {"id": alice.pk}
    assert left["data"]["reason"] == "disconnect"
    assert str(alice.pk) not in await get_backend().members(stream)
    await watcher.close()
    assert told(signals, alice) == [
        ("joined", ""),
        ("left", "disconnect"),
    ]


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_sse_stream_revoked_leaves_presence(fresh_presence):
    from board.membership import remove_member

    alice, bob = await db(UserFactory)(), await db(UserFactory)()
    _owner, project, stream = await project_with(alice, bob)
    watcher = await tab(bob)
    await watcher.subscribe(stream)
    reader = await sse_of(alice, f"{stream},user:{alice.pk}")
    await next_event(watcher, "v1:presence.joined")
    await db(remove_member)(project, alice)
    await reader.until(f'"op": "unsubscribed", "stream": "{stream}"')
    left = await next_event(watcher, "v1:presence.left")
    assert (left["data"]["user"], left["data"]["reason"]) == ({"id": alice.pk}, "forbidden")
    await reader.close()
    assert await no_event(watcher, "v1:presence.")  # her leave was announced once
    await watcher.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_hooks_see_an_sse_stream_as_a_connection_of_its_transport(fresh_presence):
    from realtime.hooks import ConnectionHooks, register_hooks, unregister_hooks

    seen: list[tuple[str, str, str]] = []

    class Recorder(ConnectionHooks):
        async def connected(self, connection):
            seen.append(("connected", connection.transport, ""))

        async def subscribed(self, connection, stream, policy):
            seen.append(("subscribed", connection.transport, stream))

        async def unsubscribed(self, connection, stream, policy, reason):
            seen.append(("unsubscribed", connection.transport, f"{stream} {reason}"))

        async def disconnected(self, connection):
            seen.append(("disconnected", connection.transport, ""))

    recorder = Recorder()
    register_hooks(recorder)
    try:
        alice = await db(UserFactory)()
        _owner, _project, stream = await project_with(alice)
        reader = await sse_of(alice, stream)
        await eventually_true(lambda: ("subscribed", "sse", stream) in seen)
        await reader.close()
        await eventually_true(lambda: seen[-1][0] == "disconnected")
    finally:
        unregister_hooks(recorder)
    assert seen == [
        ("connected", "sse", ""),
        ("subscribed", "sse", stream),
        ("unsubscribed", "sse", f"{stream} disconnect"),
        ("disconnected", "sse", ""),
    ]


async def eventually_true(test, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not test():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


class Gate(ConnectionHooks):
    """Records the hooks; `hold` names one that waits for `release` before it returns."""

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: list[str] = []

    async def _maybe_hold(self, name: str) -> None:
        if name == self.hold and not self.release.is_set():
            self.entered.set()
            await self.release.wait()

    async def subscribed(self, connection, stream, policy):
        await self._maybe_hold("subscribed")
        self.seen.append(f"subscribed {stream}")

    async def unsubscribed(self, connection, stream, policy, reason):
        await self._maybe_hold(f"unsubscribed {reason}")
        self.seen.append(f"unsubscribed {stream} {reason}")

    async def disconnected(self, connection):
        self.seen.append("disconnected")


@contextlib.contextmanager
def gate(hold: str):
    from realtime.hooks import register_hooks, unregister_hooks

    hooks = Gate(hold)
    register_hooks(hooks)
    try:
        yield hooks
    finally:
        unregister_hooks(hooks)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_revocation_during_the_subscribed_hook_waits_for_it(fresh_presence):
    from board.membership import remove_member

    alice = await db(UserFactory)()
    _owner, project, stream = await project_with(alice)
    with gate("subscribed") as hooks:
        sse = DirectSSE(alice, [stream, f"user:{alice.pk}"])
        opening = asyncio.ensure_future(sse.until("retry:"))
        await asyncio.wait_for(hooks.entered.wait(), 5)  # inside `subscribed` of the project
        await db(remove_member)(project, alice)
        await asyncio.sleep(0.3)  # the revocation is decided meanwhile, and waits
        assert hooks.seen == []
        hooks.release.set()
        await opening
        await eventually_true(lambda: len(hooks.seen) >= 3)
        await sse.close()
        await eventually_true(lambda: hooks.seen[-1] == "disconnected")
    assert hooks.seen == [
        f"subscribed {stream}",
        f"unsubscribed {stream} forbidden",  # after it, once
        f"subscribed user:{alice.pk}",
        f"unsubscribed user:{alice.pk} disconnect",
        "disconnected",
    ] or hooks.seen == [
        f"subscribed {stream}",
        f"subscribed user:{alice.pk}",
        f"unsubscribed {stream} forbidden",
        f"unsubscribed user:{alice.pk} disconnect",
        "disconnected",
    ]
    assert await get_backend().members(stream) == {}


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_stream_closed_during_a_revocations_hook_still_leaves_presence(fresh_presence):
    from board.membership import remove_member

    alice = await db(UserFactory)()
    _owner, project, stream = await project_with(alice)
    with gate("unsubscribed forbidden") as hooks:
        sse = await sse_of(alice, f"{stream},user:{alice.pk}")
        assert str(alice.pk) in await get_backend().members(stream)
        await db(remove_member)(project, alice)
        await asyncio.wait_for(hooks.entered.wait(), 5)  # the revocation's hook is running
        closing = asyncio.ensure_future(sse.close())  # the client leaves: cancels the decision
        await asyncio.sleep(0.2)
        hooks.release.set()
        await closing
        await eventually_true(lambda: hooks.seen and hooks.seen[-1] == "disconnected")
    assert hooks.seen == [
        f"subscribed {stream}",
        f"subscribed user:{alice.pk}",
        f"unsubscribed {stream} forbidden",  # ran to its end, once
        f"unsubscribed user:{alice.pk} disconnect",
        "disconnected",
    ]
    assert await get_backend().members(stream) == {}


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_user_whose_join_was_never_announced_leaves_unannounced_too(signals):
    """A join whose reply was lost waits for the next refresh to be announced; a user who
    leaves before it was never said to have joined, so nobody is told they left."""
    async with lossy_room("brief", REFRESH_INTERVAL=20.0) as (alice, stream, watcher):
        LostReplyBackend.lose["join"] = 1
        socket = await tab(alice)
        assert (await socket.subscribe(stream))["ok"]  # written, not known to be
        await socket.close()
        assert str(alice.pk) not in await get_backend().members(stream)
        assert await no_event(watcher, "v1:presence.", wait=0.6)
        await watcher.close()
    assert told(signals, alice) == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_leave_cut_off_by_the_server_before_its_reply_is_still_announced(signals):
    """The server cancels a closing socket that takes too long (daphne's close timeout)
    while the backend's answer to its leave is on the way: the leave ran, and is announced."""
    async with lossy_room("cut") as (alice, stream, watcher):
        socket = await tab(alice)
        await socket.subscribe(stream)
        await next_event(watcher, "v1:presence.joined")
        LostReplyBackend.slow["leave"] = 0.6
        await socket.communicator.disconnect(timeout=0.2)  # the application is cancelled
        left = await next_event(watcher, "v1:presence.left", timeout=5)
        assert left["data"]["user"]["id"] == alice.pk
        assert str(alice.pk) not in await get_backend().members(stream)
        await watcher.close()
    assert told(signals, alice) == [
        ("joined", ""),
        ("left", "disconnect"),
    ]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_joins_do_not_wait_in_line_for_a_stalled_redis(private_redis, signals):
    """Redis stops answering (paused: no refusal, no reply). Each join holds the loop's
    lock while it waits: without a bound, four subscribes took 5, 10, 15 and 20 s (the
    client's socket timeout, one after another). With BACKEND_TIMEOUT the first waits that
    long and the others skip the backend; once Redis answers, the refresh writes them."""
    import signal
    import types

    from presence.tracker import tracker

    def connection(user_pk: int, connection_id: str):
        user = types.SimpleNamespace(pk=user_pk, get_username=lambda: f"u{user_pk}")
        return types.SimpleNamespace(user=user, connection_id=connection_id, transport="sse")

    policy = types.SimpleNamespace(presence=True)
    settings = {
        "BACKEND": "presence.backends.redis.RedisBackend",
        "CONFIG": {"url": private_redis.url, "prefix": f"t-{uuid.uuid4().hex}"},
        "TTL": 30.0,
        "REFRESH_INTERVAL": 0.5,
        "SWEEP_INTERVAL": 60.0,
        "BACKEND_TIMEOUT": 0.5,
    }
    pid = private_redis.process.pid
    with override_settings(PRESENCE=settings):
        stop_tracker()
        try:
            await tracker.subscribed(connection(1, "warm"), "project:1", policy)
            os.kill(pid, signal.SIGSTOP)
            try:
                began = time.monotonic()
                finished = []

                async def join(n: int) -> None:
                    with contextlib.suppress(Exception):  # the first one's failure (logged)
                        await tracker.subscribed(connection(10 + n, f"c{n}"), "project:2", policy)
                    finished.append(time.monotonic() - began)

                await asyncio.gather(*(join(n) for n in range(4)))
            finally:
                os.kill(pid, signal.SIGCONT)
            # One bounded wait (0.5 s, and a refresh's 2.5 s at most ahead of it), not four
            # socket timeouts in a line (20 s).
            assert max(finished) < 4.5, finished
            async with asyncio.timeout(10):  # the refresh writes and announces them
                while len([s for _k, s, _u, _r in signals if s == "project:2"]) < 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            assert len(await get_backend().members("project:2")) == 4
        finally:
            stop_tracker()
            await get_backend().close()
    joined = sorted(user for kind, stream, user, _r in signals if stream == "project:2")
    assert joined == ["10", "11", "12", "13"]  # each announced once, by the refresh


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_a_join_and_leave_while_the_backend_rests_leave_no_trace(signals):
    """Both skip the backend (one of its calls just ran out of time): the join was never
    written nor announced, so the leave has nothing to undo; no `left` comes later either."""
    import types

    from presence.tracker import tracker

    user = types.SimpleNamespace(pk=41, get_username=lambda: "u41")
    connection = types.SimpleNamespace(user=user, connection_id="c41", transport="sse")
    policy = types.SimpleNamespace(presence=True)
    with override_settings(PRESENCE={**backend_settings(), "SWEEP_INTERVAL": 0.1, "TTL": 1.0}):
        stop_tracker()
        try:
            state = tracker.state()
            state.resting_until = time.monotonic() + 30  # as after a timeout
            await tracker.subscribed(connection, "project:41", policy)
            await tracker.unsubscribed(connection, "project:41", policy, "disconnect")
            assert state.leaving == {}
            assert state.unwritten == set()
            state.resting_until = 0.0
            await asyncio.sleep(1.0)  # refreshes and sweeps run
            assert "41" not in await get_backend().members("project:41")
        finally:
            stop_tracker()
    assert told(signals, "41") == []
