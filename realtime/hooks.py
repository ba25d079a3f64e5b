"""Extension points of connections, for apps built on realtime (presence).

An app registers an object with some of these async methods; a connection awaits each
registered object's method in registration order. A hook that raises is logged and skipped:
it can never break a connection. `connection` is the WebSocket consumer (`transport ==
"websocket"`: `connection_id`, `user`, `channel_layer`, `subscriptions` (stream ->
subscription)) or an SSE stream (`transport == "sse"`: `connection_id`, `user`,
`subscriptions`). An SSE stream calls `connected`, then `subscribed` for each of its streams
before its first byte (their return values are not used: it has no reply), `unsubscribed`
("forbidden" or "disconnect") and `disconnected`; it never calls `publishing`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("realtime.hooks")


class ConnectionHooks:
    """Base class of a hook object; every method is optional."""

    async def connected(self, connection: Any) -> None:
        """The connection (a socket, or an SSE stream) was accepted (a socket: and welcomed)."""

    async def subscribed(self, connection: Any, stream: str, policy: Any) -> dict[str, Any] | None:
        """A subscription was authorized; return extra fields for the subscribe reply's data
        (ignored for an SSE stream, which has no reply)."""
        return None

    async def unsubscribed(self, connection: Any, stream: str, policy: Any, reason: str) -> None:
        """A subscription ended: `reason` is "unsubscribe", "forbidden" or "disconnect"."""

    async def publishing(
        self, connection: Any, stream: str, policy: Any, event_type: str, data: Any
    ) -> tuple[bool, Any]:
        """A client event passed the policy and rate limits: return (forward it?, its data)."""
        return True, data

    async def disconnected(self, connection: Any) -> None:
        """The connection closed (its subscriptions got `unsubscribed` first)."""


_registered: list[ConnectionHooks] = []


def register_hooks(hooks: ConnectionHooks) -> None:
    """Add a hook object (once; registering the same object again does nothing)."""
    if hooks not in _registered:
        _registered.append(hooks)


def unregister_hooks(hooks: ConnectionHooks) -> None:
    if hooks in _registered:
        _registered.remove(hooks)


def registered() -> tuple[ConnectionHooks, ...]:
    return tuple(_registered)


async def call(name: str, *args: Any) -> list[Any]:
    """Await `name` on every hook object; return the results of those that did not raise."""
    results = []
    for hooks in tuple(_registered):
        method = getattr(hooks, name, None)
        if method is None:  # an object with only some of the methods
            continue
        try:
            results.append(await method(*args))
        except Exception:
            logger.exception("realtime hook %s.%s failed", type(hooks).__name__, name)
    return results


async def publishing(
    connection: Any, stream: str, policy: Any, event_type: str, data: Any
) -> dict[str, Any] | None:
    """Pass a client event through every hook's `publishing`; None when one holds it back."""
    for hooks in tuple(_registered):
        method = getattr(hooks, "publishing", None)
        if method is None:
            continue
        try:
            forward, data = await method(connection, stream, policy, event_type, data)
        except Exception:
            logger.exception("realtime hook %s.publishing failed", type(hooks).__name__)
            continue
        if not forward:
            return None
    return {"data": data}


async def send_ephemeral(
    stream: str,
    event_type: str,
    data: Any,
    *,
    origin: str | None = None,
    origin_user: Any = None,
    sender: dict[str, Any] | None = None,
) -> str:
    """Send an event that is not logged (no `seq`, no replay) to a stream's live subscribers.

    For client publishes, presence diffs and the like. `origin` (a connection id) and
    `origin_user` (a user pk) are left out of the delivery; `sender` becomes the frame's
    `from`. The frame is serialized once here. Returns the event's id. A layer that does not
    take the message within `PUBLISH_TIMEOUT` raises `TimeoutError`; nothing retries it.
    """
    import asyncio
    import uuid

    from channels.layers import get_channel_layer
    from django.utils import timezone

    from .conf import realtime_settings
    from .context import get_correlation_id, new_correlation_id
    from .events import dumps, format_timestamp
    from .publisher import LAYER_MESSAGE_TYPE
    from .streams import group_name, wire_id

    frame = {
        "op": "event",
        "stream": stream,
        "eventId": uuid.uuid4().hex,
        "type": event_type,
        "timestamp": format_timestamp(timezone.now()),
        # Like a logged event's: the work that caused it, or a new id of its own.
        "correlationId": get_correlation_id() or new_correlation_id(),
        **({"from": sender} if sender is not None else {}),
        "data": data,
    }
    message: dict[str, Any] = {
        "type": LAYER_MESSAGE_TYPE,
        "stream": stream,
        "ephemeral": True,
        "origin": origin or "",
        "eventType": event_type,
        "frames": {"*": dumps(frame)},
    }
    if origin_user is not None:
        message["originUser"] = wire_id(origin_user)
    layer = get_channel_layer(realtime_settings.CHANNEL_LAYER)
    async with asyncio.timeout(float(realtime_settings.PUBLISH_TIMEOUT)):
        await layer.group_send(group_name(stream), message)
    return str(frame["eventId"])
