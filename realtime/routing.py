"""WebSocket routing for the host project's ASGI application."""

from __future__ import annotations

from typing import Any

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.urls import path

from .consumers import RealtimeConsumer
from .handshake import RealtimeOriginValidator

websocket_urlpatterns: list[Any] = [path("ws/realtime/", RealtimeConsumer.as_asgi())]


def websocket_application(patterns: list[Any] | None = None) -> Any:
    """The `websocket` entry of a ProtocolTypeRouter: origin check, session auth, routing."""
    return RealtimeOriginValidator(
        AuthMiddlewareStack(URLRouter(patterns if patterns is not None else websocket_urlpatterns))
    )
