"""WebSocket URL patterns for the host project's ASGI router."""

from __future__ import annotations

from typing import Any

# The /ws/realtime/ consumer arrives with the WebSocket transport.
websocket_urlpatterns: list[Any] = []
