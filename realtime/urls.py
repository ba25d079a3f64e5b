"""HTTP URLs of the realtime app."""

from __future__ import annotations

from django.urls import path

from .api import TicketView, event_feed, metrics_view
from .conf import realtime_settings
from .sse import sse_view

app_name = "realtime"
urlpatterns = [
    path("api/realtime/tickets/", TicketView.as_view(), name="tickets"),
    path("api/realtime/events/", event_feed, name="events"),
    path("realtime/sse/", sse_view, name="sse"),
    path(str(realtime_settings.METRICS_PATH).strip("/"), metrics_view, name="metrics"),
]
