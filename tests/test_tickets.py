"""WebSocket tickets for clients without cookies: `POST /api/realtime/tickets/` with a DRF token."""

from __future__ import annotations

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


async def test_a_password_change_ends_sockets_and_only_the_session_that_made_it_comes_back():
    from django.contrib.auth import update_session_auth_hash
    from django.contrib.sessions.backends.db import SessionStore
    from django.test import RequestFactory

    from realtime.testing import session_for
    from realtime.tickets import issue

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    changer_key = await db(session_for)(owner)  # the tab that changes the password
    other_key = await db(session_for)(owner)  # another device
    sockets = [
        RealtimeClient(session_key=changer_key),
        RealtimeClient(session_key=other_key),
        RealtimeClient(path=f"/ws/realtime/?ticket={await db(issue)(owner)}"),
    ]
    for client in sockets:
        assert (await client.connect())["op"] == "welcome"
        assert (await client.subscribe(f"project:{project.pk}"))["ok"]

    def change_in_the_changers_session() -> str | None:  # as Django's PasswordChangeView does
        request = RequestFactory().post("/password/")
        request.session = SessionStore(changer_key)
        request.user = owner
        change_password(owner)
        update_session_auth_hash(request, owner)  # a new session key, holding the new hash
        request.session.save()  # as SessionMiddleware does with the response
        return request.session.session_key

    new_key = await db(change_in_the_changers_session)()
    for client in sockets:  # each is told to reconnect, none to give up (4401 is final)
        closed = await client.receive_until("websocket.close", timeout=5)
        assert closed == {"type": "websocket.close", "code": 4000}
    back = RealtimeClient(session_key=new_key)
    assert (await back.connect())["op"] == "welcome"
    assert (await back.subscribe(f"project:{project.pk}"))["ok"]
    from .factories import ItemFactory

    await db(ItemFactory)(project=project, title="after the change")
    assert (await back.receive_until("event"))["data"]["title"] == "after the change"
    await back.close()
    stale = RealtimeClient(session_key=other_key)
    assert await stale.connect() == {"type": "websocket.close", "code": 4401}


async def test_a_ticket_fetched_before_a_logout_opens_nothing_after_it_and_a_new_one_does():
    from realtime.testing import session_for
    from realtime.tickets import issue

    user = await db(UserFactory)()
    before = await db(issue)(user)
    key = await db(session_for)(user)

    def log_out() -> None:
        client = Client()
        client.cookies["sessionid"] = key
        client.logout()  # Django's logout(): user_logged_out, the session flushed

    await db(log_out)()
    refused = RealtimeClient(path=f"/ws/realtime/?ticket={before}")
    assert await refused.connect() == {"type": "websocket.close", "code": 4401}
    after = await db(issue)(user)  # logged in again somewhere, a ticket fetched from there
    welcomed = RealtimeClient(path=f"/ws/realtime/?ticket={after}")
    assert (await welcomed.connect())["op"] == "welcome"
    await welcomed.close()
