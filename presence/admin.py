"""A read-only admin page: streams with their present users and those users' connections."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from .display import display_many
from .models import Presence
from .tracker import get_backend, iso

LIMIT = 2000

logger = logging.getLogger("presence")


def _entries() -> list[Any]:
    async def read() -> list[Any]:
        backend = get_backend()
        try:
            return await backend.entries(limit=LIMIT)
        finally:
            await backend.close()

    # On an event loop of its own, whose connections it may close. Under ASGI, async_to_sync
    # would run this on the server's loop, and closing would take the connections from under
    # the sockets' presence and the REST view.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="presence-admin") as pool:
        return pool.submit(asyncio.run, read()).result()


@admin.register(Presence)
class PresenceAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Backend entries grouped by stream; nothing here can be changed."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_permission(request):
            from django.core.exceptions import PermissionDenied

            raise PermissionDenied
        from realtime.models import Connection

        unavailable = ""
        try:
            entries = _entries()
        except Exception as exc:  # Redis down: say so on the page, not as a server error
            logger.warning("presence admin: entries not read", exc_info=True)
            entries, unavailable = [], f"{type(exc).__name__}: {exc}"
        # Of everything read, before the search: a search runs on the entries read only.
        truncated = len(entries) >= LIMIT
        query = request.GET.get("q", "").strip()
        if query:
            entries = [e for e in entries if query in e.stream]
        shown = display_many(sorted({e.user_id for e in entries}))
        rows = {
            row.pk: row
            for row in Connection.objects.filter(pk__in=[e.connection_id for e in entries])
        }
        now = time.time()
        streams: dict[str, dict[str, Any]] = {}
        for entry in entries:
            users = streams.setdefault(entry.stream, {})
            user = users.setdefault(
                entry.user_id,
                {"user": shown.get(entry.user_id, {"id": entry.user_id}), "connections": []},
            )
            row = rows.get(entry.connection_id)
            user["connections"].append(
                {
                    "id": entry.connection_id,
                    "node": entry.node,
                    "expires_in": round(entry.expires_at - now, 1),
                    "expires_at": iso(entry.expires_at),
                    "transport": row.transport if row else "",
                    "connected_at": row.connected_at if row else None,
                    "last_seen": row.last_seen if row else None,
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Presence",
            "streams": sorted(
                (stream, sorted(users.values(), key=lambda u: str(u["user"].get("id"))))
                for stream, users in streams.items()
            ),
            "query": query,
            "truncated": truncated,
            "unavailable": unavailable,
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/presence/presence/change_list.html", context)
