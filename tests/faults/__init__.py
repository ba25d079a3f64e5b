"""Fault tests: each kills, pauses or floods a private redis-server or daphne of its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.typing import Origin

from board.membership import add_member
from realtime.models import Event, Stream
from realtime.publisher import publisher
from realtime.testing import flush, session_for

from ..factories import ProjectFactory, UserFactory


def relay_backlog(timeout: float) -> None:
    """After an outage: resume the publisher and run the relay until every logged event is
    published, as `realtime_relay` would in production; fail after `timeout` seconds."""
    from django.core.management import call_command

    publisher.resume()
    deadline = time.monotonic() + timeout
    while Event.objects.filter(published_at__isnull=True).exists():
        if time.monotonic() > deadline:
            raise AssertionError("the relay did not drain the backlog")
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
        time.sleep(0.2)


@dataclass
class Team:
    """A project's owner and readers, their sessions, and the stream's position now."""

    owner: Any
    readers: list[Any]
    sessions: list[str]
    owner_session: str
    project: Any
    stream: str
    base: int


def team(readers: int) -> Team:
    owner = UserFactory()
    members = [UserFactory() for _ in range(readers)]
    project: Any = ProjectFactory(owner=owner)
    for reader in members:
        add_member(project, reader)
    stream = f"project:{project.pk}"
    flush()
    return Team(
        owner=owner,
        readers=members,
        sessions=[session_for(reader) for reader in members],
        owner_session=session_for(owner),
        project=project,
        stream=stream,
        base=Stream.objects.get(name=stream).last_seq,
    )


def connect(url: str, session: str, **options: Any) -> Any:
    """A websockets client with the session cookie and an allowed origin."""
    return websockets.connect(
        url,
        origin=Origin("http://127.0.0.1"),
        additional_headers={"Cookie": f"sessionid={session}"},
        **options,
    )


async def events(socket: Any, running: Callable[[], bool]) -> AsyncIterator[dict[str, Any]]:
    """The event frames `socket` receives while `running()`, answering the server's pings."""
    while running():
        try:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 0.5))
        except TimeoutError:
            continue
        if frame.get("op") == "ping":
            await socket.send('{"op":"pong"}')
        elif frame.get("op") == "event" and "seq" in frame:
            yield frame
