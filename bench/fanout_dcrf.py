"""Reference 3 of the fan-out benchmark: fan-out the way django-channels-rest-framework does it.

A DCRF `GenericAsyncAPIConsumer` (queryset: projects) observes `Item` with
`@model_observer(Item, serializer_class=ItemSerializer)`, grouped by the item's project
(`groups_for_signal` / `groups_for_consumer`, as DCRF documents for "changes of a model
filtered by a parent"). Per connection: the socket is accepted, the client sends
`{"action": "subscribe_to_items", "request_id": "1", "project": <pk>}`, and the action (after
DCRF's `IsAuthenticated` check) loads the project with `get_object` and checks
`user.has_perm("board.view_project", project)` (guardian) in `database_sync_to_async`, joins
the project's group (`DCRF-<sha256>` of the default channel layer) and replies
`{"errors": [], "data": {"project": <pk>}, "action": "subscribe_to_items",
"response_status": 200, "request_id": "1"}`.

Per save, in the writer: DCRF's `post_init` receiver (a new item: no groups) and `post_save`
receiver, which names the item's group, serializes it once with `ItemSerializer` and sends it
on commit (at once in autocommit) with `async_to_sync(group_send)`, a deep copy per group,
through `get_channel_layer()`, a `RedisChannelLayer` (fanout_dcrf_settings). Per consumer:
DCRF's observer deep-copies the message, finds the subscribing request ids of the group, and
the handler calls `self.reply(data=<item>, action="create", request_id="1")`, which
`json.dumps` the frame and sends it. Served by daphne as `fanout_dcrf:application` with
`DJANGO_SETTINGS_MODULE=fanout_dcrf_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fanout_dcrf_settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.db import database_sync_to_async  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402
from djangochannelsrestframework import permissions  # noqa: E402
from djangochannelsrestframework.decorators import action  # noqa: E402
from djangochannelsrestframework.generics import GenericAsyncAPIConsumer  # noqa: E402
from djangochannelsrestframework.observer import model_observer  # noqa: E402
from rest_framework import status  # noqa: E402
from rest_framework.exceptions import PermissionDenied  # noqa: E402

from board.models import Item, Project  # noqa: E402
from board.serializers import ItemSerializer, ProjectSerializer  # noqa: E402


class ItemsConsumer(GenericAsyncAPIConsumer):
    """Changes of the items of the projects a client subscribes to, as DCRF replies."""

    queryset = Project.objects.all()
    serializer_class = ProjectSerializer
    permission_classes = (permissions.IsAuthenticated,)

    @model_observer(Item, serializer_class=ItemSerializer)
    async def item_activity(
        self,
        message: dict[str, Any],
        action: str,
        subscribing_request_ids: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for request_id in subscribing_request_ids or []:
            await self.reply(data=message, action=action, request_id=request_id)

    @item_activity.groups_for_signal  # type: ignore[no-redef]
    def item_activity(self, instance: Item, **kwargs: Any) -> Iterator[str]:
        yield f"project__{instance.project_id}"

    @item_activity.groups_for_consumer  # type: ignore[no-redef]
    def item_activity(self, project: int | None = None, **kwargs: Any) -> Iterator[str]:
        if project is not None:
            yield f"project__{project}"

    @action()
    async def subscribe_to_items(
        self, project: int, request_id: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], int]:
        instance = await database_sync_to_async(self.get_object)(pk=project)
        user = self.scope["user"]
        if not await database_sync_to_async(user.has_perm)("board.view_project", instance):
            raise PermissionDenied()
        await self.item_activity.subscribe(project=instance.pk, request_id=request_id)
        return {"project": instance.pk}, status.HTTP_200_OK


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([path("ws/dcrf/", ItemsConsumer.as_asgi())]))
        ),
    }
)
