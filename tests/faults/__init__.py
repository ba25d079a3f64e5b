"""Fault tests: each kills, pauses or floods a private redis-server or daphne of its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.typing import Origin

from board.membership import add_member
from realtime.models import Stream
from realtime.testing import flush, session_for

from ..factories import ProjectFactory, UserFactory


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
