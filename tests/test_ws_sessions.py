"""Re-decisions and the session a socket was opened with: engines that cannot be checked,
signing in again, signed cookies."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.contrib.sessions.backends import db as db_backend
from django.contrib.sessions.backends.base import SessionBase

from board.membership import add_member, remove_member
from realtime.consumers import user_group
from realtime.publisher import publisher
from realtime.testing import RealtimeClient, flush, session_for

from .factories import UserFactory
from .test_ws import closed_with, make_project

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]
db = sync_to_async


class SessionStore(db_backend.SessionStore):
    """A third-party engine that never implemented exists() (SessionBase's raises)."""

    exists = SessionBase.exists

    def create(self):  # the db engine's create() loops on exists(): keep it working
        self._session_key = self._get_new_session_key()
        self.save(must_create=True)
        self.modified = True

    def _get_new_session_key(self):
        from django.utils.crypto import get_random_string

        return get_random_string(32, "abcdefghijklmnopqrstuvwxyz0123456789")


async def decide_again(user) -> None:
    publisher.send_control(user_group(user.pk), {"type": "realtime.authz", "user": user.pk})
    await db(flush)()


@pytest.mark.parametrize("engine", [__name__, "django.contrib.sessions.backends.signed_cookies"])
async def test_a_session_that_cannot_be_checked_keeps_its_socket_at_a_decision(settings, engine):
    settings.SESSION_ENGINE = engine
    bob = await db(UserFactory)()
    socket = RealtimeClient(session_key=await db(session_for)(bob))
    await socket.connect()
    assert (await socket.subscribe(f"user:{bob.pk}"))["ok"] is True
    await decide_again(bob)
    assert await closed_with(socket, 1.0) is None
    await socket.send({"op": "ping", "ref": "p"})
    assert (await socket.receive_until("pong"))["ref"] == "p"
    await socket.close()


async def test_an_engine_without_exists_still_applies_a_lost_permission(settings):
    settings.SESSION_ENGINE = __name__
    _owner, project = await make_project()
    member = await db(UserFactory)()
    await db(add_member)(project, member)
    client = RealtimeClient(session_key=await db(session_for)(member))
    await client.connect()
    stream = f"project:{project.pk}"
    assert (await client.subscribe(stream))["ok"] is True
    await db(remove_member)(project, member)
    frame = await client.receive_until("unsubscribed", timeout=3.0)
    assert frame == {"op": "unsubscribed", "stream": stream, "reason": "forbidden"}
    await client.close()


async def test_signing_in_again_in_the_same_browser_reconnects_rather_than_ends():
    from importlib import import_module

    from django.conf import settings

    bob = await db(UserFactory)()
    key = await db(session_for)(bob)
    socket = RealtimeClient(session_key=key)
    await socket.connect()

    def sign_in_again():  # what login() does on a session already bob's
        session = import_module(settings.SESSION_ENGINE).SessionStore(key)
        session.load()
        session.cycle_key()
        return session.session_key

    new_key = await db(sign_in_again)()
    assert new_key != key
    await decide_again(bob)
    assert await closed_with(socket) == 4000  # reconnect: the handshake decides on the cookie
    again = RealtimeClient(session_key=new_key)
    assert (await again.connect())["op"] == "welcome"
    await again.close()
