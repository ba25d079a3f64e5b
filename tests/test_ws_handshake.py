"""The WebSocket handshake: what a refusal logs, and what an accepted socket's row records."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from realtime.models import Connection
from realtime.routing import websocket_application
from realtime.testing import RealtimeClient, session_for
from realtime.tickets import issue

from .factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

db = sync_to_async
# An allowed origin (ALLOWED_HOSTS has localhost; the port is not compared) that is easy
# to find in a log line.
ORIGIN = "http://localhost:8137"


class Lines(logging.Handler):
    """Keeps the formatted message and the fields of each record, as the logger first sees it.

    Attached to `realtime.ws` itself, so it runs before any handler's redaction filter
    upstream: what it holds is what the consumer wrote, not what redaction left of it.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.getMessage(), dict(vars(record))))


@pytest.fixture
def ws_log() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("realtime.ws")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def refusal(lines: Lines) -> tuple[str, dict[str, Any]]:
    found = [(m, f) for m, f in lines.records if m.startswith("websocket refused")]
    assert len(found) == 1, lines.records
    return found[0]


async def test_socket_without_a_session_is_logged_with_reason_and_origin(ws_log):
    client = RealtimeClient(origin=ORIGIN)
    assert await client.connect() == {"type": "websocket.close", "code": 4401}
    message, fields = refusal(ws_log)
    assert "4401" in message
    assert "not authenticated" in message
    assert ORIGIN in message
    assert fields["levelname"] == "WARNING"


@pytest.mark.parametrize("damage", ["forged", "reused"])
async def test_bad_ticket_is_logged_with_reason_and_origin_but_never_the_ticket(ws_log, damage):
    user = await db(UserFactory)()
    ticket = await db(issue)(user)
    if damage == "forged":
        ticket = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    else:
        first = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}", origin=ORIGIN)
        assert (await first.connect())["op"] == "welcome"
        await first.close()
    client = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}", origin=ORIGIN)
    assert await client.connect() == {"type": "websocket.close", "code": 4401}
    message, fields = refusal(ws_log)
    assert "4401" in message
    assert "not authenticated" in message
    assert ORIGIN in message
    # Neither the ticket nor its signature, in the line or in any field of the record.
    signature = ticket.rsplit(":", 1)[-1]
    for text in (message, repr(fields), *(m for m, _ in ws_log.records)):
        assert ticket not in text
        assert signature not in text


def with_client(address: tuple[str, int]) -> Any:
    """The realtime application, seen from a client at `address` (the communicator has none)."""
    inner = websocket_application()

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> Any:
        return await inner({**scope, "client": address}, receive, send)

    return application


async def test_connection_row_records_address_node_and_time(settings):
    settings.REALTIME = {"NODE_ID": "node-under-test"}
    user = await db(UserFactory)()
    before = timezone.now()
    client = RealtimeClient(
        with_client(("203.0.113.9", 51234)), session_key=await db(session_for)(user)
    )
    welcome = await client.connect()
    after = timezone.now()
    row = await db(Connection.objects.get)(pk=welcome["connectionId"])
    assert row.remote_addr == "203.0.113.9"
    assert row.node == "node-under-test"
    assert before - dt.timedelta(seconds=1) <= row.connected_at <= after
    assert row.connected_at.tzinfo is not None
    await client.close()


async def test_node_defaults_to_host_and_process():
    import os
    import socket

    user = await db(UserFactory)()
    client = RealtimeClient(with_client(("::1", 1)), session_key=await db(session_for)(user))
    welcome = await client.connect()
    row = await db(Connection.objects.get)(pk=welcome["connectionId"])
    assert row.node == f"{socket.gethostname()}:{os.getpid()}"
    assert row.remote_addr == "::1"
    await client.close()


@pytest.mark.parametrize("failing", ["connection row", "ticket"])
async def test_a_database_error_during_the_handshake_closes_4500_after_the_accept(
    ws_log, monkeypatch, failing
):
    """Not a rejected handshake with a traceback (a browser reads only 1006 of that): the
    socket is accepted and closed with a code the client reconnects after, and it is logged."""
    from django.db import OperationalError

    from realtime import connections, tickets

    def down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("the database is down")

    user = await db(UserFactory)()
    if failing == "ticket":
        ticket = await db(issue)(user)
        monkeypatch.setattr(tickets, "redeem", down)
        client = RealtimeClient(path=f"/ws/realtime/?ticket={ticket}", origin=ORIGIN)
    else:
        monkeypatch.setattr(connections, "open_connection", down)
        client = RealtimeClient(origin=ORIGIN, session_key=await db(session_for)(user))
    assert await client.connect() == {"type": "websocket.close", "code": 4500}
    errors = [(m, f) for m, f in ws_log.records if f["levelname"] == "ERROR"]
    assert len(errors) == 1, ws_log.records
    assert errors[0][0].startswith("connect of ")
    assert errors[0][1]["exc_info"][0] is OperationalError
    message, _fields = refusal(ws_log)
    assert "4500" in message
    assert await db(Connection.objects.filter(user=user).count)() == 0


async def test_a_refused_origin_cannot_forge_a_log_line(ws_log):
    """The client's Origin header is written quoted: a line break (a NEL, which servers pass
    in a header; a line feed, through one that does not check) or an escape sequence in it
    stays inside the one line."""
    from channels.testing import WebsocketCommunicator

    forged = b"http://evil.example\x85INFO realtime.admin forged\x1b[2J\nERROR forged"
    communicator = WebsocketCommunicator(
        websocket_application(), "/ws/realtime/", headers=[(b"origin", forged)]
    )
    await communicator.connect()
    assert (await communicator.receive_output(5))["code"] == 4403
    await communicator.disconnect()
    message, _fields = refusal(ws_log)
    assert message.splitlines() == [message]  # one line, whatever the splitter
    assert "\x1b" not in message
    assert "\x85" not in message
    assert "\\x85" in message  # the origin is shown, quoted
