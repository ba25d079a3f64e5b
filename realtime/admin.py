"""Admin: the event log and its streams (read-only), and live connections with "disconnect"."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import F, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.utils.functional import cached_property

from .models import Connection, Event, Stream


def user_search_fields(relation: str) -> list[str]:
    """The user model's login and email fields through `relation` (not every one has both)."""
    from django.contrib.auth import get_user_model

    user_model: Any = get_user_model()
    names = [user_model.USERNAME_FIELD, user_model.get_email_field_name()]
    fields = {field.name for field in user_model._meta.get_fields()}
    return [f"{relation}__{name}" for name in dict.fromkeys(names) if name in fields]


logger = logging.getLogger("realtime.admin")


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The log is written by the pipeline only; the admin shows it."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A deleted event is a hole in its stream that no resume can see; retention is
        # `realtime_prune`'s, which deletes only from the bottom of a stream.
        return False


@admin.register(Stream)
class StreamAdmin(ReadOnlyAdmin):
    list_display = ["name", "last_seq", "retained", "epoch", "retention", "created_at"]
    search_fields = ["name"]
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Stream]:
        # Pruning deletes from the bottom only and seqs have no gaps, so a stream keeps the
        # events from its first seq up to last_seq: one index probe per row listed, where
        # Count("events") grouped the whole log (for the paginator's count too).
        first = Event.objects.filter(stream=OuterRef("pk")).order_by("seq").values("seq")[:1]
        kept = Coalesce(F("last_seq") - Subquery(first) + 1, 0)
        return super().get_queryset(request).annotate(retained_events=kept)

    @admin.display(description="events kept for replay", ordering="retained_events")
    def retained(self, stream: Any) -> int:
        return int(stream.retained_events)

    @admin.display(description="retention (events)")
    def retention(self, stream: Any) -> str:
        from .conf import realtime_settings
        from .policies import stream_kinds

        policy = stream_kinds.get(stream.name.split(":", 1)[0])
        if policy is not None and policy.retention is not None:
            return f"{policy.retention} (kind)"
        default = realtime_settings.RETENTION_MAX_EVENTS
        return "unlimited" if default is None else str(default)


class StreamKindFilter(admin.SimpleListFilter):
    title = "stream kind"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from .policies import stream_kinds

        return [(kind, kind) for kind in sorted(stream_kinds.kinds())]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Event]) -> Any:
        if self.value():
            return queryset.filter(stream__name__startswith=f"{self.value()}:")
        return queryset


#: The newest events the type filter and the page count look at: the log may hold millions.
_EVENTS_LOOKED_AT = 10_000


class EventTypeFilter(admin.SimpleListFilter):
    """The types of the newest events (Django's own filter reads every row's for its choices:
    a `SELECT DISTINCT` over the whole log at each page). `?type=` filters by any type."""

    title = "type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        newest = Event.objects.order_by("-pk").values_list("type", flat=True)[:_EVENTS_LOOKED_AT]
        return [(name, name) for name in sorted(set(newest))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Event]) -> Any:
        if self.value():
            return queryset.filter(type=self.value())
        return queryset


class BoundedCountPaginator(Paginator):
    """Counts at most `_EVENTS_LOOKED_AT` + 1 rows (a `COUNT(*)` over a bounded subquery), not
    the whole log: the pages end there, and a filter (a stream, a type) narrows further."""

    @cached_property
    def count(self) -> int:
        head: Any = self.object_list[: _EVENTS_LOOKED_AT + 1]  # a queryset: the admin's
        return int(head.count())


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["stream", "seq", "type", "timestamp", "correlation_id", "published_at"]
    list_filter = [StreamKindFilter, EventTypeFilter, ("published_at", admin.EmptyFieldListFilter)]
    paginator = BoundedCountPaginator
    # `?stream__name=project:1`, `?correlation_id=…` and `?type=…` filter exactly too.
    search_fields = ["=correlation_id", "=event_id", "=stream__name"]
    list_select_related = ["stream"]
    ordering = ["-pk"]
    show_full_result_count = False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        if lookup in ("stream__name", "correlation_id", "type"):
            return True
        return super().lookup_allowed(lookup, value, request)  # type: ignore[call-arg,arg-type]


@admin.register(Connection)
class ConnectionAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "user",
        "node",
        "transport",
        "client_version",
        "streams",
        "tenant",
        "connected_at",
        "last_seen",
    ]
    list_filter = ["transport", "node", "client_version"]
    search_fields = ["=id", "tenant", "remote_addr", "subscriptions"]
    list_select_related = ["user"]
    ordering = ["-connected_at"]
    actions = ["disconnect"]

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        # The user model's own login field: a custom one may have no `username`.
        return [*user_search_fields("user"), *self.search_fields]

    @admin.display(description="streams")
    def streams(self, connection: Any) -> str:
        names = list(connection.subscriptions or [])
        return ", ".join(names[:5]) + (f" (+{len(names) - 5})" if len(names) > 5 else "")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # rows follow the sockets; "disconnect" closes a socket

    @admin.action(description="Disconnect the selected connections", permissions=["view"])
    def disconnect(self, request: HttpRequest, queryset: QuerySet[Connection]) -> None:
        from .invalidation import disconnect

        if not (request.user.is_staff and request.user.has_perm("realtime.change_connection")):
            self.message_user(request, "You may not disconnect connections.", messages.ERROR)
            return
        chosen = list(queryset.values_list("user_id", "id", "node"))
        count = disconnect((user_id, pk) for user_id, pk, _node in chosen)
        for user_id, pk, node in chosen:
            logger.warning(
                "admin %s (id %s) disconnected connection %s of user %s on node %s",
                request.user.get_username(),
                request.user.pk,
                pk,
                user_id,
                node,
                extra={"connection": pk, "user": user_id},
            )
        self.message_user(request, f"Asked {count} connection(s) to close.", messages.SUCCESS)
