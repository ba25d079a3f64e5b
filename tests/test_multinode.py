"""Two daphne nodes on one Redis: events and revocations cross nodes; real websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import urllib.parse
import urllib.request
from typing import Any

import pytest
import websockets
from asgiref.sync import async_to_sync
from websockets.typing import Origin

from board.membership import add_member, remove_member
from realtime.testing import session_for

from .conftest import redis_names
from .factories import ProjectFactory, UserFactory, server_password
from .live import Browser, Daphne, database_url


def live_env(*, realtime: dict | None = None, presence: dict | None = None) -> dict[str, str]:
    """The environment of a daphne node on this test's database and the run's Redis, with
    REALTIME and PRESENCE keys over the demo's (tests/settings_live.py)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "DATABASE_URL": database_url(),
        "REDIS_URL": os.environ["REDIS_URL"],
        "DEBUG": "1",
    }
    if realtime:
        env["TEST_REALTIME"] = json.dumps(realtime)
    if presence:
        env["TEST_PRESENCE"] = json.dumps(presence)
    return env


async def next_frame(socket, op: str, timeout: float = 10) -> dict:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await socket.recv())
            if frame.get("op") == "ping":
                await socket.send(json.dumps({"op": "pong"}))
            elif frame.get("op") == op:
                return frame


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_save_on_node_a_reaches_subscriber_on_node_b_and_revocation_follows(tmp_path):
    alice = UserFactory(username="alice", is_staff=True, is_superuser=True)
    server_password(alice, "alice-pw-1")
    alice.save()
    bob = UserFactory(username="bob")
    project = ProjectFactory(owner=alice)
    add_member(project, bob)
    bob_session = session_for(bob)
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}

    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        admin = Browser(node_a)
        admin.login("alice", "alice-pw-1")

        def add_items(*titles):
            for title in titles:
                admin.post_form(
                    "/admin/board/item/add/",
                    {"project": project.pk, "title": title, "position": 0, "version": 0},
                    {},
                ).close()

        async def scenario():
            url = f"ws://127.0.0.1:{node_b.port}/ws/realtime/"
            async with websockets.connect(
                url,
                origin="http://127.0.0.1",
                additional_headers={"Cookie": f"sessionid={bob_session}"},
            ) as socket:
                welcome = await next_frame(socket, "welcome")
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "s", "stream": f"project:{project.pk}"})
                )
                reply = await next_frame(socket, "reply")
                assert reply["ok"] is True, reply
                await asyncio.to_thread(add_items, "one", "two", "three")
                events = [await next_frame(socket, "event") for _ in range(3)]
                assert [e["data"]["title"] for e in events] == ["one", "two", "three"]
                seqs = [e["seq"] for e in events]
                assert seqs == list(range(seqs[0], seqs[0] + 3))

                # Revoked in another process; node B hears of it through Redis.
                await asyncio.to_thread(remove_member, project, bob)
                gone = await next_frame(socket, "unsubscribed", timeout=2)
                assert gone == {
                    "op": "unsubscribed",
                    "stream": f"project:{project.pk}",
                    "reason": "forbidden",
                }
                await asyncio.to_thread(add_items, "secret")
                with pytest.raises(TimeoutError):
                    await next_frame(socket, "event", timeout=1.5)
                return welcome

        welcome = async_to_sync(scenario)()
        assert welcome["protocol"] == "v1"
        assert "Traceback" not in node_a.output() + node_b.output()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_users_of_a_killed_node_leave_exactly_once_as_seen_from_the_other_node(tmp_path):
    """20 users present through node A; A gets SIGKILL; a member on node B sees each of them
    leave once (reason "expired") within TTL + sweep interval, and nothing twice."""
    import time

    ttl, sweep_every = 3.0, 1.0
    owner = UserFactory(username="presence-owner")
    project = ProjectFactory(owner=owner)
    users = [UserFactory(username=f"present{i}") for i in range(20)]
    for user in users:
        add_member(project, user)
    sessions = {user.pk: session_for(user) for user in [owner, *users]}
    stream = f"project:{project.pk}"
    presence = {
        "CONFIG": {"url": os.environ["REDIS_URL"], "prefix": redis_names()},
        "TTL": ttl,
        "REFRESH_INTERVAL": 1.0,
        "SWEEP_INTERVAL": sweep_every,
    }
    env = live_env(presence=presence)

    def connect(node, user_pk):
        return websockets.connect(
            f"ws://127.0.0.1:{node.port}/ws/realtime/",
            origin="http://127.0.0.1",
            close_timeout=0.2,  # node A is gone: do not wait for its closing handshake
            additional_headers={"Cookie": f"sessionid={sessions[user_pk]}"},
        )

    async def subscribe(socket):
        await next_frame(socket, "welcome")
        await socket.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
        reply = await next_frame(socket, "reply")
        assert reply["ok"] is True, reply
        return reply

    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:

        async def scenario():
            async with connect(node_b, owner.pk) as watcher:
                await subscribe(watcher)
                sockets = [await connect(node_a, user.pk).__aenter__() for user in users]
                try:
                    for socket in sockets:
                        await subscribe(socket)
                    joined = {
                        (await next_frame(watcher, "event"))["data"]["user"]["id"] for _ in users
                    }
                    assert joined == {user.pk for user in users}
                    async with connect(node_b, owner.pk) as late:  # the list agrees across nodes
                        reply = await subscribe(late)
                        listed = {m["user"]["id"] for m in reply["data"]["presence"]}
                        assert listed == {owner.pk, *(user.pk for user in users)}

                    node_a.process.kill()  # SIGKILL: no clean disconnect, no leave sent
                    killed = time.monotonic()
                    left = []
                    async with asyncio.timeout(ttl + 2 * sweep_every + 5):
                        while len(left) < len(users):
                            event = await next_frame(watcher, "event")
                            assert event["type"] == "v1:presence.left", event
                            left.append((event["data"]["user"]["id"], time.monotonic() - killed))
                    assert sorted(pk for pk, _ in left) == sorted(user.pk for user in users)
                    assert max(after for _, after in left) <= ttl + 2 * sweep_every + 2
                    # Exactly once: nothing more arrives.
                    with pytest.raises(TimeoutError):
                        await next_frame(watcher, "event", timeout=2 * sweep_every + 1)
                finally:
                    for socket in sockets:
                        with contextlib.suppress(Exception):
                            await socket.close()

        asyncio.run(scenario())


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_admin_disconnect_closes_a_socket_held_by_another_node(tmp_path, caplog):
    """The admin runs in this process; the socket lives in a daphne node; Redis carries it."""
    import logging
    import time

    from django.test import Client

    from realtime.models import Connection
    from realtime.testing import flush

    staff = UserFactory(username="ops", is_staff=True, is_superuser=True)
    bob = UserFactory(username="bob-kicked")
    bob_session = session_for(bob)
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}
    admin = Client()
    admin.force_login(staff)
    with Daphne(env, tmp_path / "a.log") as node:

        async def scenario():
            async with (
                websockets.connect(
                    f"ws://127.0.0.1:{node.port}/ws/realtime/",
                    origin="http://127.0.0.1",
                    additional_headers={"Cookie": f"sessionid={bob_session}"},
                ) as socket,
                websockets.connect(
                    f"ws://127.0.0.1:{node.port}/ws/realtime/",
                    origin="http://127.0.0.1",
                    additional_headers={"Cookie": f"sessionid={bob_session}"},
                ) as other,
            ):
                chosen = (await next_frame(socket, "welcome"))["connectionId"]
                kept = (await next_frame(other, "welcome"))["connectionId"]
                page = await asyncio.to_thread(
                    admin.get, "/admin/realtime/connection/", {"q": "bob-kicked"}
                )
                assert chosen in page.content.decode()
                with caplog.at_level(logging.WARNING, logger="realtime.admin"):
                    response = await asyncio.to_thread(
                        admin.post,
                        "/admin/realtime/connection/",
                        {"action": "disconnect", "_selected_action": [chosen]},
                        follow=True,
                    )
                    await asyncio.to_thread(flush)
                assert "Asked 1 connection(s) to close." in response.content.decode()
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await next_frame(socket, "never", timeout=5)
                assert closed.value.rcvd.code == 4000
                # The other socket of the same user stays open.
                await other.send(json.dumps({"op": "ping", "ref": "p"}))
                assert (await next_frame(other, "pong"))["ref"] == "p"
                return chosen, kept

        chosen, _kept = asyncio.run(scenario())
        # The closed socket's row goes with it.
        deadline = time.monotonic() + 5
        while Connection.objects.filter(pk=chosen).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Connection.objects.filter(pk=chosen).exists()
    assert any("admin ops" in r.getMessage() and chosen in r.getMessage() for r in caplog.records)


def browser_cookie(browser: Browser, name: str) -> str:
    """The value of one cookie the browser holds (its session, say)."""
    # The jar is the opener's own (tests/live.py): reached through its cookie handler.
    for handler in browser.opener.handlers:  # type: ignore[attr-defined]
        if isinstance(handler, urllib.request.HTTPCookieProcessor):
            for cookie in handler.cookiejar:
                if cookie.name == name and cookie.value:
                    return cookie.value
    raise AssertionError(f"the browser has no {name} cookie")


def post_as_page(browser: Browser, path: str, page: str = "/") -> Any:
    """POST to `path` with the CSRF token of `page`, as a form on that page does (logout)."""
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', browser.get(page))
    assert token, f"no CSRF token on {page}"
    body = urllib.parse.urlencode({"csrfmiddlewaretoken": token[1]}).encode()
    return browser.opener.open(
        urllib.request.Request(browser.server.url(path), data=body), timeout=10
    )


def socket_on(node: Daphne, session: str) -> Any:
    return websockets.connect(
        f"ws://127.0.0.1:{node.port}/ws/realtime/",
        origin=Origin("http://127.0.0.1"),
        additional_headers={"Cookie": f"sessionid={session}"},
    )


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_revoking_through_node_a_unsubscribes_on_node_b_within_a_second(tmp_path):
    """The permission is taken away by a request to node A (guardian's admin page for the
    project's object permissions); the pytest process only reads."""
    from guardian.shortcuts import get_perms

    alice = UserFactory(username="alice-admin", is_staff=True, is_superuser=True)
    server_password(alice, "alice-pw-2")
    alice.save()
    bob = UserFactory(username="bob-revoked")
    project = ProjectFactory(owner=alice)
    add_member(project, bob)
    bob_session = session_for(bob)
    stream = f"project:{project.pk}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}

    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        admin = Browser(node_a)
        admin.login("alice-admin", "alice-pw-2")

        def add_item(title: str) -> None:
            admin.post_form(
                "/admin/board/item/add/",
                {"project": project.pk, "title": title, "position": 0, "version": 0},
                {},
            ).close()

        def revoke_view() -> str:
            # The form lists the permissions bob keeps: change_project, not view_project.
            path = f"/admin/board/project/{project.pk}/permissions/user-manage/{bob.pk}/"
            with admin.post_form(path, {"permissions": "change_project"}, {}) as response:
                return response.read().decode()

        async def scenario() -> None:
            async with socket_on(node_b, bob_session) as socket:
                await next_frame(socket, "welcome")
                await socket.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
                assert (await next_frame(socket, "reply"))["ok"] is True
                await asyncio.to_thread(add_item, "before")
                assert (await next_frame(socket, "event"))["data"]["title"] == "before"

                page = await asyncio.to_thread(revoke_view)
                assert "Permissions saved." in page
                # From the moment node A answered: node B has one second.
                gone = await next_frame(socket, "unsubscribed", timeout=1.0)
                assert gone == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}

                await asyncio.to_thread(add_item, "after")
                with pytest.raises(TimeoutError):
                    await next_frame(socket, "event", timeout=1.5)
                await socket.send(json.dumps({"op": "ping", "ref": "alive"}))
                assert (await next_frame(socket, "pong"))["ref"] == "alive"

        asyncio.run(scenario())
        assert "Traceback" not in node_a.output() + node_b.output()
    assert get_perms(bob, project) == ["change_project"]  # node A did revoke it


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_logout_through_node_a_closes_the_users_sockets_on_node_b(tmp_path):
    """The browser logs in and out on node A (the logout form of the demo's pages); every
    socket of that user on node B closes with 4401, another user's stays open."""
    bob = UserFactory(username="bob-leaving")
    server_password(bob, "bob-pw-3")
    bob.save()
    carol = UserFactory(username="carol-stays")
    other_bob_session, carol_session = session_for(bob), session_for(carol)
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}

    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:
        browser = Browser(node_a)
        browser.post_form(
            "/accounts/login/", {"username": "bob-leaving", "password": "bob-pw-3"}, {}
        ).close()
        bob_session = browser_cookie(browser, "sessionid")

        async def scenario() -> None:
            async with (
                socket_on(node_b, bob_session) as same_session,
                socket_on(node_b, other_bob_session) as other_session,
                socket_on(node_b, carol_session) as bystander,
            ):
                for socket in (same_session, other_session, bystander):
                    await next_frame(socket, "welcome")
                response = await asyncio.to_thread(post_as_page, browser, "/accounts/logout/")
                response.close()
                assert response.geturl() == node_a.url("/")  # redirected: logged out
                for socket in (same_session, other_session):
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await next_frame(socket, "never", timeout=5)
                    assert closed.value.rcvd is not None
                    assert closed.value.rcvd.code == 4401
                await bystander.send(json.dumps({"op": "ping", "ref": "p"}))
                assert (await next_frame(bystander, "pong"))["ref"] == "p"

        asyncio.run(scenario())
        assert "Traceback" not in node_a.output() + node_b.output()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_user_on_sse_through_one_node_is_present_on_the_other_past_the_ttl(tmp_path):
    """Alice reads over SSE through node A (her network blocks WebSockets); Bob's socket on
    node B sees her join, sees no leave while her stream lasts longer than the TTL (node A
    refreshes her entry), and sees her leave once when she goes."""
    import http.client

    ttl = 3.0
    owner = UserFactory(username="sse-owner")
    alice = UserFactory(username="sse-alice")
    project = ProjectFactory(owner=owner)
    add_member(project, alice)
    stream = f"project:{project.pk}"
    presence = {
        "CONFIG": {"url": os.environ["REDIS_URL"], "prefix": redis_names()},
        "TTL": ttl,
        "REFRESH_INTERVAL": 1.0,
        "SWEEP_INTERVAL": 1.0,
    }
    env = live_env(presence=presence)
    owner_session, alice_session = session_for(owner), session_for(alice)

    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:

        async def scenario() -> None:
            async with websockets.connect(
                f"ws://127.0.0.1:{node_b.port}/ws/realtime/",
                origin=Origin("http://127.0.0.1"),
                additional_headers={"Cookie": f"sessionid={owner_session}"},
            ) as watcher:
                await next_frame(watcher, "welcome")
                await watcher.send(json.dumps({"op": "subscribe", "ref": "s", "stream": stream}))
                assert (await next_frame(watcher, "reply"))["ok"] is True
                sse = http.client.HTTPConnection("127.0.0.1", node_a.port, timeout=10)
                await asyncio.to_thread(
                    sse.request,
                    "GET",
                    f"/realtime/sse/?streams={stream}",
                    headers={"Cookie": f"sessionid={alice_session}"},
                )
                response = await asyncio.to_thread(sse.getresponse)
                assert response.status == 200
                joined = await next_frame(watcher, "event")
                assert joined["type"] == "v1:presence.joined", joined
                assert joined["data"]["user"]["username"] == "sse-alice"
                # Past the TTL and a sweep: node A keeps her entry fresh.
                with pytest.raises(TimeoutError):
                    await next_frame(watcher, "event", timeout=ttl + 2)
                sse.close()  # she goes: the server notices the disconnect
                left = await next_frame(watcher, "event", timeout=ttl + 5)
                assert left["type"] == "v1:presence.left", left
                assert left["data"]["user"]["id"] == alice.pk
                assert left["data"]["reason"] == "disconnect"  # not a TTL expiry
                with pytest.raises(TimeoutError):
                    await next_frame(watcher, "event", timeout=2)  # once

        asyncio.run(scenario())
        assert "Traceback" not in node_a.output() + node_b.output()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_users_sockets_on_two_nodes_share_one_publish_bucket(tmp_path):
    """Burst 6 per user: three sockets on node A and three on node B publish 4 each; 6 pass
    in all (each node's own bucket would pass 6 on each)."""

    owner = UserFactory(username="bucket-owner")
    project = ProjectFactory(owner=owner)
    stream = f"project:{project.pk}"
    session = session_for(owner)
    realtime = {
        "PUBLISH_RATE": 0.001,  # nothing comes back during the test
        "PUBLISH_BURST": 6,
        "PUBLISH_USER_REDIS": {"url": os.environ["REDIS_URL"], "prefix": redis_names()},
    }
    env = live_env(realtime=realtime)
    with Daphne(env, tmp_path / "a.log") as node_a, Daphne(env, tmp_path / "b.log") as node_b:

        async def scenario() -> list[bool]:
            sockets = []
            for node in (node_a, node_a, node_a, node_b, node_b, node_b):
                socket = await websockets.connect(
                    f"ws://127.0.0.1:{node.port}/ws/realtime/",
                    origin=Origin("http://127.0.0.1"),
                    additional_headers={"Cookie": f"sessionid={session}"},
                )
                await next_frame(socket, "welcome")
                sockets.append(socket)
            answers = []
            try:
                for n in range(4):
                    for i, socket in enumerate(sockets):
                        ref = f"p{n}-{i}"
                        frame = {"op": "publish", "ref": ref, "stream": stream}
                        frame |= {"type": "v1:typing.started", "data": {}}
                        await socket.send(json.dumps(frame))
                        reply = await next_frame(socket, "reply")
                        assert reply["ref"] == ref
                        if not reply["ok"]:
                            assert reply["error"]["code"] == "rate_limited", reply
                        answers.append(reply["ok"])
            finally:
                for socket in sockets:
                    await socket.close()
            return answers

        answers = asyncio.run(scenario())
        assert answers.count(True) == 6, answers  # one bucket: 6 in all, on both nodes
        assert "Traceback" not in node_a.output() + node_b.output()
