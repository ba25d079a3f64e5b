"""Read-only admin for the event log and its streams."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Connection, Event, Stream


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The log is written by the pipeline only; the admin shows it."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Stream)
class StreamAdmin(ReadOnlyAdmin):
    list_display = ["name", "last_seq", "epoch", "created_at"]
    search_fields = ["name"]


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["stream", "seq", "type", "timestamp", "correlation_id", "published_at"]
    list_filter = ["type", ("published_at", admin.EmptyFieldListFilter)]
    search_fields = ["=correlation_id", "=event_id", "stream__name"]
    list_select_related = ["stream"]
    ordering = ["-pk"]


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "user",
        "node",
        "transport",
        "client_version",
        "tenant",
        "connected_at",
        "last_seen",
    ]
    list_filter = ["transport", "node"]
    search_fields = ["=id", "user__username", "tenant", "remote_addr"]
    list_select_related = ["user"]
    ordering = ["-connected_at"]
