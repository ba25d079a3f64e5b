"""Reference 1 of the fan-out benchmark: fan-out the way a hand-rolled Channels app does it.

A plain `AsyncWebsocketConsumer` joins the group `items-<pk>` of a `RedisChannelLayer` on
connect; the writer's `post_save` handler calls `async_to_sync(group_send)` with the item's
serializer data per save, and every consumer `json.dumps` the message and sends it. Served by
daphne as `fanout_plain:application` with `DJANGO_SETTINGS_MODULE=fanout_settings`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fanout_settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.db import database_sync_to_async  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

#: The channel-layer alias (a `RedisChannelLayer`) in fanout_settings.
LAYER = "plain"
MESSAGE_TYPE = "item.changed"


def group(project_pk: int) -> str:
    return f"items-{project_pk}"


def may_view(user: Any, project_pk: int) -> bool:
    from board.models import Project

    project = Project.objects.filter(pk=project_pk).first()
    return project is not None and user.has_perm("board.view_project", project)


class ItemsConsumer(AsyncWebsocketConsumer):
    """Items of one project, as `{"op": "event", ...}` frames."""

    channel_layer_alias = LAYER

    async def connect(self) -> None:
        user = self.scope["user"]
        pk = int(self.scope["url_route"]["kwargs"]["pk"])
        if not user.is_authenticated or not await database_sync_to_async(may_view)(user, pk):
            await self.close()
            return
        self.group = group(pk)
        self.stream = f"project:{pk}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send(text_data=json.dumps({"op": "reply", "ref": "1", "ok": True}))

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        pass  # pongs

    async def item_changed(self, event: dict[str, Any]) -> None:
        frame = {
            "op": "event",
            "stream": self.stream,
            "type": "v1:item.created" if event["created"] else "v1:item.updated",
            "data": event["item"],
        }
        await self.send(text_data=json.dumps(frame))


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([path("ws/items/<int:pk>/", ItemsConsumer.as_asgi())]))
        ),
    }
)
