"""Helpers for testing code that emits realtime events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from asgiref.sync import sync_to_async

from .conf import realtime_settings
from .publisher import publisher
from .streams import group_name


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

    async def group_send(group: str, message: dict[str, Any]) -> None:
        sent.append((group, message))
        await original(group, message)

    layer.group_send = group_send
    try:
        yield sent
    finally:
        del layer.group_send


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
