"""REST API of a user's own notifications, with ETags, preconditions and stream positions.

Every query starts from the requesting user's notifications, so another user's id is simply
not found (404): a user can never see, count or change someone else's notifications.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django.db.models import Count, Max, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

from realtime.conditional import (
    ConditionalReadMixin,
    stream_positions,
)
from realtime.context import collect_positions
from realtime.openapi import (
    IF_MATCH,
    IF_NONE_MATCH,
    NOT_MODIFIED,
    error,
    read_headers,
    write_headers,
)

from .models import LEVEL_CHOICES, LEVELS, Notification, Preference
from .service import (
    changing,
    read_all,
    represent,
    set_read,
    soft_delete,
    stream_of,
    unread_count,
)


class RefSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A related object as it was when the notification was made."""

    type = serializers.CharField(help_text="app_label.model")
    id = serializers.CharField()
    repr = serializers.CharField()


class NotificationSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A notification, in the same shape as the data of its `v1:notification.created` event."""

    id = serializers.IntegerField(read_only=True)
    verb = serializers.CharField(read_only=True)
    level = serializers.ChoiceField(choices=LEVEL_CHOICES, read_only=True)
    actor = RefSerializer(read_only=True, allow_null=True)
    target = RefSerializer(read_only=True, allow_null=True)
    action_object = RefSerializer(read_only=True, allow_null=True)
    # DRF's metaclass moves declared fields off the class: `Serializer.data` is untouched.
    data = serializers.JSONField(read_only=True)  # type: ignore[assignment]
    created_at = serializers.DateTimeField(read_only=True)
    read_at = serializers.DateTimeField(read_only=True, allow_null=True)
    unread = serializers.BooleanField(read_only=True)

    def to_representation(self, instance: Notification) -> dict[str, Any]:
        return represent(instance)


class PreferenceSerializer(serializers.ModelSerializer):  # type: ignore[type-arg]
    muted_verbs = serializers.ListField(
        child=serializers.CharField(max_length=255), max_length=200, required=False
    )
    muted_levels = serializers.ListField(
        child=serializers.ChoiceField(choices=LEVEL_CHOICES), max_length=len(LEVELS), required=False
    )

    class Meta:
        model = Preference
        fields = ["muted_verbs", "muted_levels"]


class NewestFirst(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100

    def get_page_size(self, request: Request) -> int:
        # DRF falls back to the default on a bad value; a client's mistake should be a 400.
        problem = self.page_size_problem(request)
        if problem:
            raise ValidationError({"page_size": problem})
        value = request.query_params.get(self.page_size_query_param)
        return self.page_size if value is None else int(value)

    def page_size_problem(self, request: Request) -> str | None:
        value = request.query_params.get(self.page_size_query_param)
        if value is None:
            return None
        # ASCII digits only: str.isdigit() takes '²', which int() refuses.
        if not re.fullmatch(r"[0-9]{1,4}", value) or not 1 <= int(value) <= self.max_page_size:
            return f"An integer from 1 to {self.max_page_size}."
        return None

    def decode_cursor(self, request: Request) -> Any:
        cursor = super().decode_cursor(request)
        # DRF trusts the position it decoded: a forged one reached the query (a 500).
        position = None if cursor is None else cursor.position
        if position is not None and not self.position_is_valid(str(position)):
            raise NotFound(self.invalid_cursor_message)
        return cursor

    @staticmethod
    def position_is_valid(position: str) -> bool:
        """Whether a cursor's position is a time the database can take."""
        try:
            moment = parse_datetime(position)
            if moment is None:
                return False
            if timezone.is_naive(moment):
                moment = timezone.make_aware(moment)
            # The query converts it to UTC (SQLite in Python): 9999-12-31T23:59:59-01:00
            # parses, then overflows past year 9999 there (an OverflowError, a 500).
            moment.astimezone(dt.UTC)
        except (ValueError, OverflowError):
            return False
        return True


UNREAD = OpenApiParameter(
    "unread", OpenApiTypes.BOOL, description="true: only unread ones; false: only read ones."
)
LEVEL = OpenApiParameter("level", str, enum=list(LEVELS), description="Only this level.")
ID = OpenApiParameter(
    "id", {"type": "integer", "minimum": 1}, OpenApiParameter.PATH, description="Its id."
)
NOT_FOUND = error("Not one of your notifications (another user's id is not found either).")
FORBIDDEN = error("Not authenticated.")
FIELD_ERRORS = OpenApiResponse(OpenApiTypes.OBJECT, description="Invalid data: errors by field.")
COUNT = inline_serializer("UnreadCount", {"unread_count": serializers.IntegerField()})
CHANGED = inline_serializer(
    "ReadAll",
    {
        "count": serializers.IntegerField(help_text="How many were marked read."),
        "ids": serializers.ListField(
            child=serializers.IntegerField(),
            required=False,
            help_text="The ids marked read; only when they are at most 1,000.",
        ),
        "unread_count": serializers.IntegerField(),
    },
)


#: `read` and `unread`: the notification back, preconditions as for `DELETE`.
MARK_SCHEMA: dict[str, Any] = {
    "request": None,
    "parameters": [ID, IF_MATCH, *write_headers(200)],
    "responses": {
        200: NotificationSerializer,
        403: FORBIDDEN,
        404: NOT_FOUND,
        412: error("If-Match is stale."),
    },
}


@extend_schema_view(
    list=extend_schema(
        parameters=[UNREAD, LEVEL, IF_NONE_MATCH, *read_headers()],
        responses={
            200: NotificationSerializer(many=True),
            304: NOT_MODIFIED,
            400: FIELD_ERRORS,
            404: error("The cursor is not valid."),
            403: FORBIDDEN,
        },
    ),
    retrieve=extend_schema(
        parameters=[ID, IF_NONE_MATCH, *read_headers()],
        responses={200: NotificationSerializer, 304: NOT_MODIFIED, 403: FORBIDDEN, 404: NOT_FOUND},
    ),
    destroy=extend_schema(
        parameters=[ID, IF_MATCH, *write_headers(204)],
        responses={204: None, 403: FORBIDDEN, 404: NOT_FOUND, 412: error("If-Match is stale.")},
    ),
)
@extend_schema(tags=["notifications"])
class NotificationViewSet(
    ConditionalReadMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,  # type: ignore[type-arg]
):
    """The requesting user's notifications, newest first; DELETE hides one (soft delete)."""

    serializer_class = NotificationSerializer
    permission_classes = [permissions.IsAuthenticated]
    pagination_class = NewestFirst
    lookup_value_regex = r"[0-9]+"
    # A muted notification is stored without an event: the pks keep the list's ETag honest.
    etag_lists_pks = True

    def get_queryset(self) -> QuerySet[Notification]:
        query = Notification.objects.for_user(self.request.user)
        if self.action != "list":
            return query
        self.check_list_parameters()
        params = self.request.query_params
        unread = params.get("unread")
        if unread is not None:
            query = query.filter(read_at__isnull=unread.lower() in ("true", "1"))
        level = params.get("level")
        if level is not None:
            query = query.filter(level=level)
        return query

    def check_list_parameters(self) -> None:
        """A 400 with a message for every bad filter or paging value, not the first alone."""
        params = self.request.query_params
        errors: dict[str, str] = {}
        unread = params.get("unread")
        if unread is not None and unread.lower() not in ("true", "false", "1", "0"):
            errors["unread"] = "Use true or false."
        level = params.get("level")
        if level is not None and level not in LEVELS:
            errors["level"] = f"Use one of {', '.join(LEVELS)}."
        paginator = self.paginator
        if isinstance(paginator, NewestFirst):
            problem = paginator.page_size_problem(self.request)
            if problem:
                errors["page_size"] = problem
        if errors:
            raise ValidationError(errors)

    def listed_pks(self, queryset: Any) -> Any:
        # Every change but a muted notification's making is an event on the user's stream;
        # that one adds a row (a new highest id), and a row deleted without an event (a
        # queryset's delete in code) lowers the count: one aggregate row covers both, however
        # many the user has, where the ids of all of them were read for every list request.
        found = queryset.order_by().aggregate(count=Count("pk"), newest=Max("pk"))
        return [found["count"], found["newest"]]

    def get_streams(self, obj: Any = None) -> list[str]:
        return [stream_of(self.request.user)]

    def get_list_state(self) -> Any:
        # Bad paging parameters are a 400 (a 404 for a cursor) even when If-None-Match would
        # match: the ETag is decided before the paginator would have looked at them.
        self.check_list_parameters()
        paginator = self.paginator
        if isinstance(paginator, NewestFirst):
            paginator.decode_cursor(self.request)
        return super().get_list_state()

    def get_permission_state(self, obj: Any = None) -> Any:
        return [self.request.user.pk]  # only ever the user's own rows

    def get_version(self, obj: Any) -> Any:
        return [obj.read_at, obj.deleted_at]

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Soft delete: hidden from the user, kept for the admin."""
        with changing(request.user), collect_positions() as written:
            instance = self._locked(kwargs[self.lookup_url_kwarg or self.lookup_field])
            self.check_if_match(instance)
            soft_delete(request.user, [instance.pk])
        return self.with_position(Response(status=status.HTTP_204_NO_CONTENT), written)

    def _locked(self, pk: Any) -> Notification:
        """The user's notification `pk`, its row locked until the transaction ends (else 404).

        Found and locked in one read: a change committed meanwhile (marked read) either waits
        for this write, or is seen by its If-Match check. A read before the lock would miss a
        delete committed in between, and the locked read then found nothing (a 500). Call it
        in `changing(user)`: the stream before the row, as a read-all takes them.
        """
        try:
            pk = int(pk)
        except (ValueError, TypeError):
            raise NotFound() from None
        instance = self.get_queryset().select_for_update().filter(pk=pk).first()
        if instance is None:
            raise NotFound()
        self.check_object_permissions(self.request, instance)
        return instance

    def _set_read(self, pk: Any, read: bool) -> Response:
        with changing(self.request.user), collect_positions() as written:
            instance = self._locked(pk)
            self.check_if_match(instance)
            set_read(self.request.user, [instance.pk], read=read)
            # Read in the transaction: a delete committed right after it is no 404 for a
            # change that was made.
            instance.refresh_from_db(fields=["read_at"])
        return self.with_position(Response(represent(instance)), written)

    @extend_schema(**MARK_SCHEMA)
    @action(detail=True, methods=["post"])
    def read(self, request: Request, pk: Any = None) -> Response:
        """Mark it read (no change if it was)."""
        return self._set_read(pk, True)

    @extend_schema(**MARK_SCHEMA)
    @action(detail=True, methods=["post"])
    def unread(self, request: Request, pk: Any = None) -> Response:
        """Mark it unread again."""
        return self._set_read(pk, False)

    @extend_schema(
        request=None, parameters=write_headers(200), responses={200: CHANGED, 403: FORBIDDEN}
    )
    @action(detail=False, methods=["post"], url_path="read-all")
    def read_all(self, request: Request) -> Response:
        """Mark every unread notification read; one `v1:notification.read` event for them all.

        Answers how many were marked (`count`) and, when they are at most 1,000, their `ids`.
        """
        with collect_positions() as written:
            answer = read_all(request.user)
        return self.with_position(Response(answer), written)

    @extend_schema(
        parameters=[IF_NONE_MATCH, IF_MATCH, *read_headers()],
        responses={
            200: COUNT,
            304: NOT_MODIFIED,
            403: FORBIDDEN,
            412: error("If-Match is stale."),
        },
    )
    @action(detail=False, methods=["get"], url_path="unread-count")
    def unread_count(self, request: Request) -> Response:
        """How many are unread (also carried by every notification event as `unread_count`)."""
        positions = stream_positions(self.get_streams())
        count = unread_count(request.user)
        etag = self.representation_etag(positions, request.user.pk, count)
        if self.check_preconditions(etag):
            return self._conditional(Response(status=status.HTTP_304_NOT_MODIFIED), etag, positions)
        return self._conditional(Response({"unread_count": count}), etag, positions)

    @extend_schema(methods=["GET"], responses={200: PreferenceSerializer, 403: FORBIDDEN})
    @extend_schema(
        methods=["PUT"],
        request=PreferenceSerializer,
        responses={200: PreferenceSerializer, 400: FIELD_ERRORS, 403: FORBIDDEN},
    )
    @action(detail=False, methods=["get", "put"], serializer_class=PreferenceSerializer)
    def preferences(self, request: Request) -> Response:
        """What is not pushed live: muted verbs and levels (such notifications are still stored)."""
        preference, _ = Preference.objects.get_or_create(user=request.user)  # type: ignore[misc]
        if request.method == "PUT":
            serializer = PreferenceSerializer(preference, data=request.data)
            serializer.is_valid(raise_exception=True)
            serializer.save()
        return Response(PreferenceSerializer(preference).data)
