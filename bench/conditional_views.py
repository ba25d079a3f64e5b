"""The urlconf of the conditional-GET benchmark: config.urls plus drf-extensions viewsets.

The drf-extensions viewsets list a project's items with the demo API's queryset, serializer
and permission classes; only the ETag machinery differs:

- `DrfExtItems`: `ListETAGMixin` with its default list key constructor
  (`DefaultListKeyConstructor`: method id, format, language, the queryset's SQL text and
  the pagination parameters), mounted at /bench/drf-ext/projects/<pk>/items/.
- `DrfExtApiItems`: `APIListETAGMixin` with `DefaultAPIModelListKeyConstructor` (the rows'
  values), mounted at /bench/drf-ext-api/projects/<pk>/items/.

Two references that are not products either:

- `FloorItems` (/bench/floor/projects/<pk>/items/): plain DRF; with any If-None-Match it
  answers 304 right after DRF's authentication and permission checks, computing nothing.
  Its 304 is the floor of this stack (test Client, middleware, session, DRF).
- `SuggestedItems` (/bench/suggested/projects/<pk>/items/): board.api.ItemViewSet with the
  changes suggested by the benchmark's profile, as a bench-only prototype (the project's
  code is not changed): the project and the user's permissions on it are read once per
  request with one guardian checker, the list query filters by the project id alone once
  that check passed, and the positions come from one query of `Stream` rows.
- `OneQueryItems` (/bench/one-query/projects/<pk>/items/): a bench-only prototype of a
  validator in one SQL statement: the stream's seq and epoch, the user's object permissions
  on the project (direct and through groups), the project's existence and the items' count
  and largest id, read together; the serializer runs only when the ETag does not match.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.models import QuerySet
from django.urls import include, path
from guardian.core import ObjectPermissionChecker
from guardian.models import GroupObjectPermission, UserObjectPermission
from rest_framework import mixins, permissions, status, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework_extensions.etag.mixins import APIListETAGMixin, ListETAGMixin

from board.api import ItemViewSet, ProjectPermission, visible_projects
from board.models import Item, Project
from board.serializers import ItemSerializer
from realtime.conditional import etag_matches, make_etag
from realtime.models import Stream


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


class SuggestedItems(ItemViewSet):
    """Bench-only prototype of the suggested changes to board.api and realtime.conditional."""

    _project: Project | None = None  # type: ignore[assignment]
    _perms: tuple[str, ...] = ()

    def project(self) -> Project:
        if self._project is not None:
            return self._project
        try:
            project = Project.objects.get(pk=self.kwargs["project_pk"])
        except Project.DoesNotExist:
            raise NotFound() from None
        # One checker: the user's and the groups' object permissions, two queries, once.
        perms = ObjectPermissionChecker(self.request.user).get_perms(project)
        if "view_project" not in perms:  # what visible_projects() asks (no global perms)
            raise NotFound()
        if self.request.method not in permissions.SAFE_METHODS:
            self.check_object_permissions(self.request, project)
        # (for safe methods ProjectPermission asks view_project, checked just above)
        self._project, self._perms = project, tuple(sorted(perms))
        return project

    def get_permission_state(self, obj: Any = None) -> Any:
        if obj is None:
            self.project()
            return [self.request.user.pk, list(self._perms)]
        return super().get_permission_state(obj)

    def get_queryset(self) -> QuerySet[Item]:
        if self._project is not None:  # visibility checked: no guardian subquery again
            return Item.objects.filter(project_id=self._project.pk).order_by("position", "pk")
        return super().get_queryset()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        self.check_list_permissions()
        streams = self.get_streams(None)
        rows = Stream.objects.filter(name__in=streams).values_list("name", "last_seq", "epoch")
        found = {name: (seq, epoch) for name, seq, epoch in rows}
        positions: dict[str, tuple[int, str | None]] = {s: found.get(s, (0, None)) for s in streams}
        queryset = self.filter_queryset(self.get_queryset())
        etag = make_etag(
            [[s, *found.get(s, (0, None))] for s in streams],  # seq and epoch
            self.get_permission_state(None),
            self.get_list_state(),
            list(queryset.values_list("pk", flat=True)[:10_000]),
        )
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return self._conditional(Response(status=status.HTTP_304_NOT_MODIFIED), etag, positions)
        response = Response(self.get_serializer(queryset, many=True).data)
        return self._conditional(response, etag, positions)


def _one_query_sql() -> str:
    q = connection.ops.quote_name
    t = {
        "stream": q(Stream._meta.db_table),
        "uop": q(UserObjectPermission._meta.db_table),
        "gop": q(GroupObjectPermission._meta.db_table),
        "perm": q(Permission._meta.db_table),
        "groups": q(get_user_model().groups.through._meta.db_table),
        "project": q(Project._meta.db_table),
        "item": q(Item._meta.db_table),
    }
    return f"""
        SELECT 'stream', s.last_seq, s.epoch FROM {t["stream"]} s WHERE s.name = %s
        UNION ALL
        SELECT 'perm', NULL, p.codename FROM {t["uop"]} u
            JOIN {t["perm"]} p ON p.id = u.permission_id
            WHERE u.user_id = %s AND u.content_type_id = %s AND u.object_pk = %s
        UNION ALL
        SELECT 'perm', NULL, p.codename FROM {t["gop"]} g
            JOIN {t["perm"]} p ON p.id = g.permission_id
            JOIN {t["groups"]} ug ON ug.group_id = g.group_id
            WHERE ug.user_id = %s AND g.content_type_id = %s AND g.object_pk = %s
        UNION ALL
        SELECT 'project', pr.id, NULL FROM {t["project"]} pr WHERE pr.id = %s
        UNION ALL
        SELECT 'items', COUNT(*), CAST(MAX(i.id) AS VARCHAR(20)) FROM {t["item"]} i
            WHERE i.project_id = %s
    """


class OneQueryItems(SuggestedItems):
    """Bench-only prototype: the whole ETag from one SQL statement."""

    _sql: str | None = None

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        if not self.request.user.is_active:
            raise NotFound()
        pk = int(self.kwargs["project_pk"])
        stream = f"project:{pk}"
        content_type = ContentType.objects.get_for_model(Project).pk  # cached
        user = request.user.pk
        if OneQueryItems._sql is None:
            OneQueryItems._sql = _one_query_sql()
        params = [stream, user, content_type, str(pk), user, content_type, str(pk), pk, pk]
        with connection.cursor() as cursor:
            cursor.execute(OneQueryItems._sql, params)
            rows = cursor.fetchall()
        perms = sorted(text for kind, _n, text in rows if kind == "perm")
        if not any(kind == "project" for kind, _n, _t in rows) or "view_project" not in perms:
            raise NotFound()
        seq, epoch = next(((n, t) for kind, n, t in rows if kind == "stream"), (0, None))
        items = next((n, t) for kind, n, t in rows if kind == "items")
        etag = make_etag([seq, epoch], [user, perms], self.get_list_state(), items)
        positions: dict[str, tuple[int, str | None]] = {stream: (seq, epoch)}
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return self._conditional(Response(status=status.HTTP_304_NOT_MODIFIED), etag, positions)
        queryset = Item.objects.filter(project_id=pk).order_by("position", "pk")
        response = Response(self.get_serializer(queryset, many=True).data)
        return self._conditional(response, etag, positions)


def _list(view: Any) -> Any:
    return view.as_view({"get": "list"})


urlpatterns = [
    path("bench/drf-ext/projects/<int:project_pk>/items/", _list(DrfExtItems)),
    path("bench/drf-ext-api/projects/<int:project_pk>/items/", _list(DrfExtApiItems)),
    path("bench/floor/projects/<int:project_pk>/items/", _list(FloorItems)),
    path("bench/suggested/projects/<int:project_pk>/items/", _list(SuggestedItems)),
    path("bench/one-query/projects/<int:project_pk>/items/", _list(OneQueryItems)),
    path("", include("config.urls")),
]
