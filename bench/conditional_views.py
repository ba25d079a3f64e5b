"""The urlconf of the conditional-GET benchmark: config.urls plus drf-extensions viewsets.

The drf-extensions viewsets list a project's items with the demo API's queryset, serializer
and permission classes; only the ETag machinery differs:

- `DrfExtItems`: `ListETAGMixin` with its default list key constructor
  (`DefaultListKeyConstructor`: method id, format, language, the queryset's SQL text and
  the pagination parameters), mounted at /bench/drf-ext/projects/<pk>/items/.
- `DrfExtApiItems`: `APIListETAGMixin` with `DefaultAPIModelListKeyConstructor` (the rows'
  values), mounted at /bench/drf-ext-api/projects/<pk>/items/.

A reference that is not a product either:

- `FloorItems` (/bench/floor/projects/<pk>/items/): plain DRF; with any If-None-Match it
  answers 304 right after DRF's authentication and permission checks, computing nothing.
  Its 304 is the floor of this stack (test Client, middleware, session, DRF).
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.urls import include, path
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework_extensions.etag.mixins import APIListETAGMixin, ListETAGMixin

from board.api import ProjectPermission, visible_projects
from board.models import Item
from board.serializers import ItemSerializer


class _SameItems(mixins.ListModelMixin, viewsets.GenericViewSet):  # type: ignore[type-arg]
    serializer_class = ItemSerializer
    permission_classes = [permissions.IsAuthenticated, ProjectPermission]

    def get_queryset(self) -> QuerySet[Item]:
        # As board.api.ItemViewSet.get_queryset: items of visible projects, this project's.
        items = Item.objects.filter(project__in=visible_projects(self.request.user))
        return items.filter(project_id=self.kwargs["project_pk"]).order_by("position", "pk")


class DrfExtItems(ListETAGMixin, _SameItems):
    """drf-extensions' ETag mixin with its default list key constructor."""


class DrfExtApiItems(APIListETAGMixin, _SameItems):
    """drf-extensions' API ETag mixin, whose key is built from the rows' values."""


class FloorItems(_SameItems):
    """Plain DRF list; any If-None-Match is answered 304 after authentication, unchecked."""

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if request.headers.get("If-None-Match"):
            response = Response(status=status.HTTP_304_NOT_MODIFIED)
            response["ETag"] = request.headers["If-None-Match"]
            return response
        response = super().list(request, *args, **kwargs)
        response["ETag"] = '"floor"'
        return response


def _list(view: Any) -> Any:
    return view.as_view({"get": "list"})


urlpatterns = [
    path("bench/drf-ext/projects/<int:project_pk>/items/", _list(DrfExtItems)),
    path("bench/drf-ext-api/projects/<int:project_pk>/items/", _list(DrfExtApiItems)),
    path("bench/floor/projects/<int:project_pk>/items/", _list(FloorItems)),
    path("", include("config.urls")),
]
