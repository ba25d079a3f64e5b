"""The demo board's REST API, on realtime's conditional-request mixin."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from guardian.shortcuts import get_objects_for_user
from rest_framework import mixins, permissions, viewsets
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request

from realtime.conditional import RealtimeResourceMixin

from .membership import create_project
from .models import Item, Project
from .serializers import ItemSerializer, ItemWriteSerializer, ProjectSerializer


def visible_projects(user: Any) -> QuerySet[Project]:
    return get_objects_for_user(
        user, "board.view_project", klass=Project, accept_global_perms=False
    )


class ProjectPermission(permissions.BasePermission):
    """Read needs view_project on the project, writes change_project, delete delete_project."""

    def has_object_permission(self, request: Request, view: Any, obj: Any) -> bool:
        project = obj if isinstance(obj, Project) else obj.project
        if request.method in permissions.SAFE_METHODS:
            perm = "board.view_project"
        elif request.method == "DELETE" and isinstance(obj, Project):
            perm = "board.delete_project"
        else:
            perm = "board.change_project"
        return bool(request.user.has_perm(perm, project))


class ProjectViewSet(RealtimeResourceMixin, viewsets.ModelViewSet):  # type: ignore[type-arg]
    """Projects the user can see; creating one makes the user its owner."""

    serializer_class = ProjectSerializer
    permission_classes = [permissions.IsAuthenticated, ProjectPermission]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self) -> QuerySet[Project]:
        # Objects the user cannot see are simply not found (404), so existence does not leak.
        return visible_projects(self.request.user).order_by("pk")

    def get_streams(self, obj: Any = None) -> list[str]:
        if obj is not None:
            return [f"project:{obj.pk}"]
        orgs = self.request.user.organizations.values_list("pk", flat=True)  # type: ignore[union-attr]
        return [f"tenant:{pk}" for pk in orgs]

    def perform_create(self, serializer: Any) -> None:
        organization = serializer.validated_data["organization"]
        if not organization.members.filter(pk=self.request.user.pk).exists():
            raise PermissionDenied("You are not a member of that organization.")
        serializer.instance = create_project(
            organization=organization,
            name=serializer.validated_data["name"],
            owner=self.request.user,
        )


class ItemViewSet(
    RealtimeResourceMixin,
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,  # type: ignore[type-arg]
):
    """Items: listed and created under /api/projects/<id>/items/, changed at /api/items/<id>/."""

    serializer_class = ItemSerializer
    permission_classes = [permissions.IsAuthenticated, ProjectPermission]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_serializer_class(self) -> type[ItemSerializer]:
        # An item's project comes from the URL; it is not moved through this API.
        if self.action in ("create", "partial_update"):
            return ItemWriteSerializer
        return ItemSerializer

    def project(self) -> Project:
        project = get_object_or_404(
            visible_projects(self.request.user), pk=self.kwargs["project_pk"]
        )
        self.check_object_permissions(self.request, project)
        return project

    def get_queryset(self) -> QuerySet[Item]:
        items = Item.objects.filter(project__in=visible_projects(self.request.user))
        if "project_pk" in self.kwargs:
            items = items.filter(project_id=self.kwargs["project_pk"])
        return items.order_by("position", "pk")

    def get_streams(self, obj: Any = None) -> list[str]:
        if obj is not None:
            return [f"project:{obj.project_id}"]
        return [f"project:{self.kwargs['project_pk']}"]

    def get_permission_state(self, obj: Any = None) -> Any:
        if obj is None:
            return super().get_permission_state(self.project())
        return super().get_permission_state(obj.project)

    def check_list_permissions(self) -> None:
        if "project_pk" not in self.kwargs:
            raise NotFound()
        self.project()

    def perform_create(self, serializer: Any) -> None:
        if "project_pk" not in self.kwargs:
            raise NotFound()
        serializer.save(project=self.project())


class ItemCreateSerializer(ItemSerializer):
    class Meta(ItemSerializer.Meta):
        read_only_fields = ["project", "version", "updated_at"]


ItemViewSet.get_serializer_class = lambda self: (  # type: ignore[method-assign]
    ItemCreateSerializer
    if self.action in ("create", "update", "partial_update")
    else ItemSerializer
)
