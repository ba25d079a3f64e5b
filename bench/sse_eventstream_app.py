"""The django-eventstream side of the SSE benchmark: urlconf, channel manager, ASGI app.

Served by daphne as `sse_eventstream_app:application` with
`DJANGO_SETTINGS_MODULE=sse_eventstream_settings` and bench/ on `PYTHONPATH`. One channel per
project, `project-<pk>`, at /events/project/<pk>/; reading it needs `board.view_project` on
the project (guardian), as our `project:<pk>` stream does.
"""

from __future__ import annotations

import os
from typing import Any

import django_eventstream
from django.core.asgi import get_asgi_application
from django.urls import include, path
from django_eventstream.channelmanager import DefaultChannelManager

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sse_eventstream_settings")
application = get_asgi_application()

PREFIX = "project-"


def channel_of(project_pk: int) -> str:
    return f"{PREFIX}{project_pk}"


class ProjectChannelManager(DefaultChannelManager):  # type: ignore[misc]
    """`project-<pk>` only, readable by users with view_project on the project."""

    def get_channels_for_request(self, request: Any, view_kwargs: dict[str, Any]) -> set[str]:
        return {channel_of(view_kwargs["project_pk"])}

    def can_read_channel(self, user: Any, channel: str) -> bool:
        from board.models import Project

        key = channel.removeprefix(PREFIX)
        if user is None or not user.is_authenticated or not key.isdigit():
            return False
        return bool(user.has_perm("board.view_project", Project(pk=int(key))))


urlpatterns = [
    path("events/project/<int:project_pk>/", include(django_eventstream.urls)),
]
