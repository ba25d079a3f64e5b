"""WebSocket tickets for clients without cookies: `POST /api/realtime/tickets/` with a DRF token."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from rest_framework.authtoken.models import Token

from realtime.models import Connection
from realtime.testing import RealtimeClient

from .factories import ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

db = sync_to_async


def post_ticket(authorization: str) -> tuple[int, dict[str, object]]:
    """POST for a ticket with only an Authorization header: no session cookie, no CSRF token."""
    # enforce_csrf_checks: a token request must pass without the CSRF token a session needs.
    response = Client(enforce_csrf_checks=True).post(
        "/api/realtime/tickets/", headers={"Authorization": authorization}
    )
    return response.status_code, response.json()


async def test_a_token_gets_a_ticket_that_opens_a_socket_as_the_tokens_user():
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    await db(UserFactory)()  # another user, so "the first user" would not pass by chance
    token = await db(Token.objects.create)(user=owner)

    status, body = await db(post_ticket)(f"Token {token.key}")
    assert status == 201, body
    assert body["expiresIn"] == 60

    client = RealtimeClient(path=f"/ws/realtime/?ticket={body['ticket']}")
    welcome = await client.connect()
    assert welcome["op"] == "welcome"
    row = await db(Connection.objects.get)(pk=welcome["connectionId"])
    assert row.user_id == owner.pk
    assert (await client.subscribe(f"project:{project.pk}"))["ok"] is True
    await client.close()


@pytest.mark.parametrize("case", ["unknown key", "inactive user"])
async def test_a_bad_token_gets_no_ticket(case):
    user = await db(UserFactory)(is_active=case != "inactive user")
    token = await db(Token.objects.create)(user=user)
    key = "0" * 40 if case == "unknown key" else token.key

    status, body = await db(post_ticket)(f"Token {key}")
    # 403, not 401: SessionAuthentication comes first in the demo's settings and sends no
    # WWW-Authenticate header, so DRF answers 403 for every authentication failure.
    assert status == 403
    assert "ticket" not in body
    # Token authentication refused the key; it was not ignored as an unknown header.
    expected = "Invalid token." if case == "unknown key" else "User inactive or deleted."
    assert body == {"detail": expected}


def change_password(user) -> None:
    user.set_password("a-new-password-123")
    user.save()


async def test_a_ticket_issued_before_a_password_change_is_refused_after_it():
    from realtime.tickets import issue

    user = await db(UserFactory)()
    ticket = await db(issue)(user)
    await db(change_password)(user)
    client = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}")
    assert await client.connect() == {"type": "websocket.close", "code": 4401}


async def test_a_password_change_closes_the_sockets_of_other_sessions_and_of_tickets():
    from realtime.testing import session_for
    from realtime.tickets import issue

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    on_session = RealtimeClient(session_key=await db(session_for)(owner))
    on_ticket = RealtimeClient(path=f"/ws/realtime/?ticket={await db(issue)(owner)}")
    for client in (on_session, on_ticket):
        assert (await client.connect())["op"] == "welcome"
        assert (await client.subscribe(f"project:{project.pk}"))["ok"]
    await db(change_password)(owner)  # as Django's own views do: the other sessions end
    for client in (on_session, on_ticket):
        closed = await client.receive_until("websocket.close", timeout=5)
        assert closed == {"type": "websocket.close", "code": 4401}


async def test_the_session_that_changed_the_password_keeps_its_socket():
    from django.contrib.auth import HASH_SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    from realtime.testing import session_for

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    key = await db(session_for)(owner)
    client = RealtimeClient(session_key=key)
    assert (await client.connect())["op"] == "welcome"
    assert (await client.subscribe(f"project:{project.pk}"))["ok"]

    def change_in_this_session() -> None:  # what update_session_auth_hash() leaves behind
        change_password(owner)
        session = SessionStore(key)
        session[HASH_SESSION_KEY] = owner.get_session_auth_hash()
        session.save()

    await db(change_in_this_session)()
    await asyncio.sleep(0.5)  # the re-decision the save caused runs meanwhile
    from .factories import ItemFactory

    await db(ItemFactory)(project=project, title="still here")
    event = await client.receive_until("event", timeout=5)
    assert event["data"]["title"] == "still here"
    await client.close()
