"""Helpers for testing code that emits realtime events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from asgiref.sync import sync_to_async

from .conf import realtime_settings
from .publisher import publisher
from .streams import group_name


def close_db_connections() -> None:
    """Close the publisher's own database connection, so a test database can be dropped."""
    from .publisher import close_ack_connections

    close_ack_connections()


def flush(timeout: float = 10.0) -> None:
    """Wait until every event committed so far was published (or handed to the relay)."""
    if not publisher.flush(timeout):
        raise AssertionError(f"realtime publisher did not drain within {timeout}s")


@contextlib.contextmanager
def record_group_sends() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Record every (group, message) the publisher hands to the channel layer, still sending it."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer(realtime_settings.CHANNEL_LAYER)
    sent: list[tuple[str, dict[str, Any]]] = []
    original = layer.group_send
    # An outer recorder's patch, to put back on exit (nested recorders both record).
    shadowed = vars(layer).get("group_send")

    async def group_send(group: str, message: dict[str, Any]) -> None:
        sent.append((group, message))
        await original(group, message)

    layer.group_send = group_send
    try:
        yield sent
    finally:
        if shadowed is None:
            del layer.group_send
        else:
            layer.group_send = shadowed


async def receive_published(
    streams: list[str],
    action: Callable[[], Any],
    *,
    count: int = 1,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> list[dict[str, Any]]:
    """Listen on the streams' groups, run the sync `action`, and return `count` layer messages.

    The action runs in a thread with this loop as its main loop, as a view does under an
    ASGI server, so the publisher sends on this loop.
    """
    from channels.layers import get_channel_layer

    layer = get_channel_layer(realtime_settings.CHANNEL_LAYER)
    channel = await layer.new_channel()
    for stream in streams:
        await layer.group_add(group_name(stream), channel)
    try:
        await sync_to_async(action)()
        messages = []
        for _ in range(count):
            async with asyncio.timeout(timeout):
                messages.append(await layer.receive(channel))
        # Let the publisher finish (published marks included) before this loop closes.
        await sync_to_async(publisher.flush)(timeout)
        return messages
    finally:
        for stream in streams:
            await layer.group_discard(group_name(stream), channel)


class RealtimeClient:
    """A protocol v1 client over Channels' WebsocketCommunicator, for tests of host projects."""

    def __init__(
        self,
        application: Any = None,
        *,
        path: str = "/ws/realtime/",
        origin: str | None = "http://127.0.0.1",
        session_key: str | None = None,
    ) -> None:
        from channels.testing import WebsocketCommunicator
        from django.conf import settings

        if application is None:
            from .routing import websocket_application

            application = websocket_application()
        headers = [(b"origin", origin.encode())] if origin else []
        if session_key:
            cookie = f"{settings.SESSION_COOKIE_NAME}={session_key}"
            headers.append((b"cookie", cookie.encode()))
        self.communicator = WebsocketCommunicator(application, path, headers=headers)
        self.refs = 0
        self.welcome: dict[str, Any] | None = None

    async def connect(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Open the socket; return the welcome frame, or the close message if refused."""
        connected, _ = await self.communicator.connect(timeout)
        assert connected, "the handshake was not accepted"
        first = await self.communicator.receive_output(timeout)
        if first["type"] == "websocket.close":
            return first
        self.welcome = json.loads(first["text"])
        return self.welcome

    async def send(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        await self.communicator.send_to(text_data=text)

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The next frame as a dict, or the close message ({"type": "websocket.close", ...})."""
        message = await self.communicator.receive_output(timeout)
        if message["type"] == "websocket.close":
            return message
        return json.loads(message["text"])  # type: ignore[no-any-return]

    async def receive_until(self, op: str, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Skip frames (pings, for one) until one with `op` arrives."""
        while True:
            frame = await self.receive(timeout)
            if frame.get("op") == op or frame.get("type") == "websocket.close":
                return frame

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a frame with a fresh ref and return its reply, skipping other frames."""
        self.refs += 1
        ref = str(self.refs)
        await self.send({"op": op, "ref": ref, **fields})
        while True:
            frame = await self.receive()
            if frame.get("op") == "reply" and frame.get("ref") == ref:
                return frame
            if frame.get("type") == "websocket.close":
                raise AssertionError(f"socket closed while waiting for reply {ref}: {frame}")

    async def subscribe(self, stream: str, **fields: Any) -> dict[str, Any]:
        return await self.request("subscribe", stream=stream, **fields)

    async def nothing_more(self, timeout: float = 0.2) -> bool:  # noqa: ASYNC109
        """Whether no frame other than a ping arrives within `timeout` (the socket stays up)."""
        while not await self.communicator.receive_nothing(timeout):
            if (await self.receive()).get("op") != "ping":
                return False
        return True

    async def close(self) -> None:
        await self.communicator.disconnect()


def session_for(user: Any) -> str:
    """Log `user` in and return the session key (call from sync code)."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    from django.conf import settings

    return str(client.cookies[settings.SESSION_COOKIE_NAME].value)
