"""Admin: every notification, filterable and searchable, with a bulk "mark read"."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from realtime.admin import user_search_fields

from .models import Notification, Preference
from .service import delete_by_admin, mark_read_by_admin


class ReadFilter(admin.SimpleListFilter):
    title = "read"
    parameter_name = "read"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Unread"), ("yes", "Read")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Notification]) -> Any:
        if self.value() == "no":
            return queryset.filter(read_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(read_at__isnull=False)
        return queryset


class DeletedFilter(admin.SimpleListFilter):
    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "Visible"), ("yes", "Deleted by the user")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Notification]) -> Any:
        if self.value() == "no":
            return queryset.filter(deleted_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["id", "recipient", "verb", "level", "created_at", "read_at", "deleted_at"]
    list_filter = [ReadFilter, DeletedFilter, "level", "verb", "created_at"]
    search_fields = ["verb"]  # and the recipient's login and email: get_search_fields
    list_select_related = ["recipient"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Notification._meta.concrete_fields]
    actions = ["mark_read"]
    show_full_result_count = False

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        return [*user_search_fields("recipient"), *self.search_fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # made by notify(), which also emits the event

    def delete_model(self, request: HttpRequest, obj: Notification) -> None:
        # As the API's delete does, tell the recipient's tabs (and their unread count).
        delete_by_admin(Notification.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        delete_by_admin(queryset)

    @admin.action(description="Mark selected notifications read", permissions=["change"])
    def mark_read(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        changed = mark_read_by_admin(queryset)
        self.message_user(request, f"{changed} notification(s) marked read.", messages.SUCCESS)


@admin.register(Preference)
class PreferenceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["user", "muted_verbs", "muted_levels"]
    raw_id_fields = ["user"]

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        return user_search_fields("user")
