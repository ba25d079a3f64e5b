"""The demo board's REST API, on realtime's conditional-request mixin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from guardian.shortcuts import get_objects_for_user
from rest_framework import mixins, permissions, viewsets
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.settings import api_settings

from notifications import notify
from realtime.conditional import ListParent, RealtimeResourceMixin
from realtime.openapi import (
    IDEMPOTENCY_KEY,
    IF_MATCH,
    IF_NONE_MATCH,
    NOT_MODIFIED,
    error,
    read_headers,
    write_headers,
)

from .membership import create_project, readers
from .models import Item, Project
from .serializers import (
    NAME_TAKEN,
    ItemSerializer,
    ItemWriteSerializer,
    ProjectOwnerSerializer,
    ProjectSerializer,
    ProjectUpdateSerializer,
)


def visible_projects(user: Any) -> QuerySet[Project]:
    return get_objects_for_user(
        user, "board.view_project", klass=Project, accept_global_perms=False
    )


# -- OpenAPI (drf-spectacular) annotations; they document, they change no behaviour ----------


INVALID = OpenApiResponse(OpenApiTypes.OBJECT, description="Invalid data: errors by field.")
FORBIDDEN = error("Not authenticated, or not allowed to do this to a visible object.")
NOT_FOUND = error("No such object, or one the user may not see (existence does not leak).")
STALE = error("If-Match does not match the current ETag: nothing was changed.")
KEY_REUSED = error("This Idempotency-Key was used for a different request.")
CREATE_ERRORS = {
    400: INVALID,
    403: FORBIDDEN,
    422: KEY_REUSED,
}


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
        object_perms = getattr(view, "object_perms", None)
        if object_perms is not None and request.user.is_active:
            # The view's checker, shared with its ETag, reads the permissions once.
            return perm.split(".", 1)[1] in object_perms(project)
        return bool(request.user.has_perm(perm, project))


# Ids are positive: /api/items/<int:pk>/ does not even route a negative one.
ID = {"type": "integer", "minimum": 1}
PROJECT_ID = OpenApiParameter("id", ID, OpenApiParameter.PATH, description="The project's id.")


@extend_schema_view(
    list=extend_schema(
        parameters=[IF_NONE_MATCH, *read_headers()],
        responses={200: ProjectSerializer(many=True), 304: NOT_MODIFIED, 403: FORBIDDEN},
    ),
    retrieve=extend_schema(
        parameters=[PROJECT_ID, IF_NONE_MATCH, *read_headers()],
        responses={
            200: OpenApiResponse(
                ProjectSerializer,
                description="The project; its owner (who may delete it) also gets `members`, "
                "the ids of its members.",
            ),
            304: NOT_MODIFIED,
            403: FORBIDDEN,
            404: NOT_FOUND,
        },
    ),
    create=extend_schema(
        parameters=[IDEMPOTENCY_KEY, *write_headers(201)],
        responses={201: ProjectSerializer, **CREATE_ERRORS},
    ),
    partial_update=extend_schema(
        parameters=[PROJECT_ID, IF_MATCH, *write_headers(200)],
        request=ProjectUpdateSerializer,
        responses={
            200: ProjectSerializer,
            400: INVALID,
            403: FORBIDDEN,
            404: NOT_FOUND,
            412: STALE,
        },
    ),
    destroy=extend_schema(
        parameters=[PROJECT_ID, IF_MATCH, *write_headers(204)],
        responses={204: None, 403: FORBIDDEN, 404: NOT_FOUND, 412: STALE},
    ),
)
class ProjectViewSet(RealtimeResourceMixin, viewsets.ModelViewSet):  # type: ignore[type-arg]
    """Projects the user can see; creating one makes the user its owner."""

    serializer_class = ProjectSerializer
    permission_classes = [permissions.IsAuthenticated, ProjectPermission]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_serializer_class(self) -> type[ProjectSerializer]:
        return ProjectUpdateSerializer if self.action == "partial_update" else ProjectSerializer

    def get_serializer(self, *args: Any, **kwargs: Any) -> Any:
        # Its owner reads a project with its members, as the owner audience of its stream
        # does (ProjectPolicy.audiences); the ETag follows the reader's permissions already.
        instance = args[0] if args else kwargs.get("instance")
        if (
            self.action == "retrieve"
            and isinstance(instance, Project)
            and "delete_project" in self.object_perms(instance)
        ):
            kwargs.setdefault("context", self.get_serializer_context())
            return ProjectOwnerSerializer(*args, **kwargs)
        return super().get_serializer(*args, **kwargs)

    def get_queryset(self) -> QuerySet[Project]:
        # Objects the user cannot see are simply not found (404), so existence does not leak.
        return visible_projects(self.request.user).order_by("pk")

    def get_streams(self, obj: Any = None) -> list[str]:
        if obj is not None:
            return [f"project:{obj.pk}"]
        # A listed project may belong to any organization (a guardian permission, or every
        # project for a superuser), and each change to it is an event on its tenant stream;
        # the user's own tenants are added so the list's position serves their feeds too.
        user: Any = self.request.user
        listed = visible_projects(user).order_by().values_list("organization_id", flat=True)
        own = user.organizations.order_by().values_list("pk", flat=True)
        return [f"tenant:{pk}" for pk in sorted(listed.union(own))]  # one query

    def perform_create(self, serializer: Any) -> None:
        # The serializer's organization is one of the user's (MemberOrganizationField).
        organization = serializer.validated_data["organization"]
        name = serializer.validated_data["name"]
        with name_in_use_is_400(organization, name):
            serializer.instance = create_project(
                organization=organization, name=name, owner=self.request.user
            )

    def perform_update(self, serializer: Any) -> None:
        project = serializer.instance
        name = serializer.validated_data.get("name", project.name)
        with name_in_use_is_400(project.organization, name, project):
            serializer.save()


@contextmanager
def name_in_use_is_400(organization: Any, name: str, project: Any = None) -> Iterator[None]:
    """A name taken by a concurrent write, past the serializer's check, answers as the check.

    Two creates (or renames) with one name both pass the check, and the second's write fails
    the unique constraint: an IntegrityError, which was a 500.
    """
    try:
        with transaction.atomic():  # a savepoint: the request's transaction stays usable
            yield
    except IntegrityError:
        taken = Project.objects.filter(organization=organization, name=name)
        if project is not None:
            taken = taken.exclude(pk=project.pk)
        if not taken.exists():
            raise  # another constraint
        error = {api_settings.NON_FIELD_ERRORS_KEY: [NAME_TAKEN]}
        raise ValidationError(error, code="unique") from None


PROJECT_PK = OpenApiParameter(
    "project_pk", ID, OpenApiParameter.PATH, description="The id of the items' project."
)
ITEM_ID = OpenApiParameter("id", ID, OpenApiParameter.PATH, description="The item's id.")


@extend_schema_view(
    list=extend_schema(
        parameters=[PROJECT_PK, IF_NONE_MATCH, *read_headers()],
        responses={
            200: ItemSerializer(many=True),
            304: NOT_MODIFIED,
            403: FORBIDDEN,
            404: NOT_FOUND,
        },
    ),
    create=extend_schema(
        parameters=[PROJECT_PK, IDEMPOTENCY_KEY, *write_headers(201)],
        request=ItemWriteSerializer,
        responses={201: ItemSerializer, **CREATE_ERRORS, 404: NOT_FOUND},
    ),
    retrieve=extend_schema(
        parameters=[ITEM_ID, IF_NONE_MATCH, *read_headers()],
        responses={200: ItemSerializer, 304: NOT_MODIFIED, 403: FORBIDDEN, 404: NOT_FOUND},
    ),
    partial_update=extend_schema(
        parameters=[ITEM_ID, IF_MATCH, *write_headers(200)],
        request=ItemWriteSerializer,
        responses={
            200: ItemSerializer,
            400: INVALID,
            403: FORBIDDEN,
            404: NOT_FOUND,
            412: STALE,
        },
    ),
    destroy=extend_schema(
        parameters=[ITEM_ID, IF_MATCH, *write_headers(204)],
        responses={204: None, 403: FORBIDDEN, 404: NOT_FOUND, 412: STALE},
    ),
)
@extend_schema(tags=["items"])
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
    # An item shows its own fields only, and every save bumps its version: its tag need not
    # move with the other items of its project.
    etag_object_positions = False
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    # Every change to a project's items is an event on project:<pk> (items are registered
    # there), so the stream position alone tells whether the list changed.
    etag_lists_pks = False
    # The list's 404, the reader's permissions on the project and the stream position come
    # from one query (realtime.conditional.parent_state), so a 304 costs just that query.
    list_parent = ListParent(Project, "project_pk", "view_project")

    def get_serializer_class(self) -> type[ItemSerializer]:
        # An item's project comes from the URL; it is not moved through this API.
        if self.action in ("create", "partial_update"):
            return ItemWriteSerializer
        return ItemSerializer

    def project(self) -> Project:
        """The project of a nested URL, once per request: 404 unless the user may view it."""
        cached = getattr(self, "_project", None)
        if cached is not None:
            return cached
        project = Project.objects.filter(pk=self.kwargs["project_pk"]).first()
        if project is None or "view_project" not in self.object_perms(project):
            raise NotFound()  # the same answer whether it is missing or hidden
        self.check_object_permissions(self.request, project)
        self._project = project
        return project

    def get_queryset(self) -> QuerySet[Item]:
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular reading the types
            return Item.objects.none()
        if self.action == "list":
            self.checked_parent()  # 404 unless the user may view the project
            items = Item.objects.filter(project_id=self.kwargs["project_pk"])
            return items.order_by("position", "pk")
        if "project_pk" in self.kwargs:
            return Item.objects.filter(project=self.project()).order_by("position", "pk")
        items = Item.objects.filter(project__in=visible_projects(self.request.user))
        return items.order_by("position", "pk")

    def get_streams(self, obj: Any = None) -> list[str]:
        if obj is not None:
            return [f"project:{obj.project_id}"]
        return [f"project:{self.kwargs.get('project_pk')}"]

    def get_permission_state(self, obj: Any = None) -> Any:
        return super().get_permission_state(self.project() if obj is None else obj.project)

    def perform_create(self, serializer: Any) -> None:
        if "project_pk" not in self.kwargs:
            raise NotFound()
        project = self.project()
        item = serializer.save(project=project)
        # The project's other readers hear of it, in the same transaction as the item.
        others = readers(project).exclude(pk=self.request.user.pk)
        notify(
            others, "added an item to", actor=self.request.user, target=project, action_object=item
        )
