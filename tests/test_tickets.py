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
