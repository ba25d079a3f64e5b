"""HTTP URLs of the realtime app."""

from __future__ import annotations

from django.urls import path

from .api import TicketView, event_feed
from .sse import sse_view

app_name = "realtime"
urlpatterns = [
    path("api/realtime/tickets/", TicketView.as_view(), name="tickets"),
    path("api/realtime/events/", event_feed, name="events"),
    path("realtime/sse/", sse_view, name="sse"),
]
