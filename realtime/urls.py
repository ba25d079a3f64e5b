"""HTTP URLs of the realtime app."""

from __future__ import annotations

from django.urls import path

from .api import TicketView

app_name = "realtime"
urlpatterns = [
    path("api/realtime/tickets/", TicketView.as_view(), name="tickets"),
]
