"""Reference of the idle-connections benchmark: bare daphne and a Channels consumer.

An `AsyncWebsocketConsumer` that accepts every socket and does nothing else: no
authentication, no channel layer, no database, no heartbeat of its own (daphne's protocol
pings still run). Served by daphne as `connections_bare:application` with bench/ on
`PYTHONPATH`; it configures Django itself.
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="bench-only-not-a-secret", ALLOWED_HOSTS=["127.0.0.1"]
    )
    django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import ProtocolTypeRouter


class Idle(AsyncWebsocketConsumer):
    """Accepts, then ignores whatever arrives."""

    async def connect(self) -> None:
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        pass


application: Any = ProtocolTypeRouter({"websocket": Idle.as_asgi()})
