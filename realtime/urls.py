"""HTTP URLs of the realtime app (tickets, event feed, SSE arrive with their transports)."""

from __future__ import annotations

from typing import Any

app_name = "realtime"
urlpatterns: list[Any] = []
