"""Conditional requests for DRF views: ETag/304, If-Match/412, Idempotency-Key, stream positions.

`RealtimeResourceMixin` goes on a `GenericAPIView` (or viewset) whose resources are published
on streams. Reads answer `ETag` and `X-Stream-Position`; the ETag comes from the streams'
positions, the object's version and the user's permission state, never from serializing, and
is computed after DRF has authenticated the request and checked object permissions, so a user
who may not see an object never gets a 304 for it. Preconditions follow RFC 9110, 13.2.2 (a
stale `If-Match` is 412 on reads and writes, a matching `If-None-Match` 304 on reads and 412 on
writes); writes report the position of the events they caused; a POST with an
`Idempotency-Key` is done once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import IntegrityError, connections, models, router, transaction
from django.http import HttpRequest, HttpResponseNotModified
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.http import parse_etags
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from .conf import realtime_settings
from .context import collect_positions
from .cursor import header
from .policies import fits_integer_column

_REPLAYED_HEADERS = ("Location", "ETag", "X-Stream-Position", "Content-Type")


class PreconditionFailed(APIException):
    status_code = status.HTTP_412_PRECONDITION_FAILED
    default_detail = "The resource changed since you read it (If-Match does not match)."
    default_code = "precondition_failed"


_NONE_MATCHED = "If-None-Match names the resource as it is now (or is *): nothing was changed."


class IdempotencyMismatch(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_detail = "This Idempotency-Key was used for a different request."
    default_code = "idempotency_key_reused"


def stream_positions(streams: list[str]) -> dict[str, tuple[int, str | None]]:
    """Current {stream: (seq, epoch)} in one query; read it before the data, so a client
    resuming from it misses nothing. A stream with no events is `(0, None)`, whether or not
    its row exists yet (a writer that locks it makes the row, with an epoch): a tag read
    before that write still names the state the write finds."""
    from .models import Stream

    found = {
        name: (seq, epoch if seq else None)
        for name, seq, epoch in Stream.objects.filter(name__in=streams).values_list(
            "name", "last_seq", "epoch"
        )
    }
    return {stream: found.get(stream, (0, None)) for stream in streams}


def _seqs(positions: dict[str, tuple[int, str | None]]) -> dict[str, int]:
    return {stream: seq for stream, (seq, _epoch) in positions.items()}


#: Lists up to this many rows put their pks in the ETag as they are; longer ones a digest.
_LISTED_PKS = 10_000


def _digest(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def make_etag(*parts: Any) -> str:
    return f'"{_digest(parts)[:32]}"'


def etag_matches(
    header_value: str | None, etag: str, *, weak: bool = True, state: bool = False
) -> bool:
    """Whether an If-None-Match (`weak`) or If-Match header names `etag`, or is `*`.

    If-None-Match compares weakly (`W/"x"` matches `"x"`); If-Match strongly (RFC 9110,
    13.1.1): a weak tag never matches there. With `state`, only the state part of an object's
    tag is compared (see `ConditionalReadMixin.object_etag`), so a tag of any of its bodies
    matches while the object is unchanged.
    """
    tags = parse_etags(header_value or "")
    if tags == ["*"]:
        return True
    if weak:
        tags = [tag.removeprefix("W/") for tag in tags]
    if state:
        return _state(etag) in {_state(tag) for tag in tags}
    return etag in tags


def _state(tag: str) -> str:
    """The state part of an object's tag, `"<state>.<representation>"`; all of any other tag."""
    return tag.partition(".")[0]


@dataclass(frozen=True)
class ListParent:
    """The guardian-protected object a nested list belongs to (a project's items).

    `model` is its class, `kwarg` the URL keyword holding its pk and `permission` the
    codename a reader needs on it. With one set, a list's existence and permission check,
    the user's permissions on the parent and the stream positions are read together in
    one SQL statement (`parent_state`), so a 304 costs one query after authentication.
    """

    model: type[models.Model]
    kwarg: str
    permission: str


@dataclass(frozen=True)
class ParentState:
    exists: bool
    perms: tuple[str, ...]
    positions: dict[str, tuple[int, str | None]]


@lru_cache(maxsize=64)
def _parent_sql(
    model: type[models.Model], alias: str, streams: int, superuser: bool
) -> tuple[str, tuple[str, ...]]:
    """The statement `parent_state` runs and the names of its parameters after the streams.

    Rows: ('s', stream name, last seq, epoch) for each stream found, or one row of NULLs,
    only if the object exists (the join); ('p', codename, NULL, NULL) for each of the user's
    object permissions, direct or through a group (every permission of the model for a
    superuser). Codenames are joined from the permission table on every call: a cache of
    them would be one more thing to keep right about who may read what.
    """
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from guardian.utils import get_group_obj_perms_model, get_user_obj_perms_model

    from .models import Stream

    def q(name: Any) -> str:
        return str(connections[alias].ops.quote_name(name))

    def column(meta: Any, name: str) -> str:
        return q(meta.get_field(name).column)

    marks = ", ".join(["%s"] * streams) or "NULL"
    parts = [
        f"SELECT 's', s.{q('name')}, s.{q('last_seq')}, s.{q('epoch')} "
        f"FROM {q(model._meta.db_table)} o LEFT JOIN {q(Stream._meta.db_table)} s "
        f"ON s.{q('name')} IN ({marks}) WHERE o.{q(model._meta.pk.column)} = %s",
    ]
    params = ["pk"]
    permission = q(Permission._meta.db_table)
    if superuser:  # guardian gives a superuser every permission of the model
        parts.append(
            f"SELECT 'p', p.{q('codename')}, NULL, NULL FROM {permission} p "
            f"WHERE p.{q('content_type_id')} = %s"
        )
        params.append("content_type")
        return "\nUNION ALL\n".join(parts), tuple(params)
    groups = get_user_model()._meta.get_field("groups").remote_field.through._meta  # type: ignore[union-attr]
    for kind, table in (
        ("user", get_user_obj_perms_model(model)),  # type: ignore[arg-type]  # a class works
        ("group", get_group_obj_perms_model(model)),  # type: ignore[arg-type]
    ):
        meta = table._meta
        if kind == "user":
            join, who = "", f"t.{column(meta, 'user')} = %s"
        else:
            group = column(meta, "group")
            join = f"JOIN {q(groups.db_table)} ug ON ug.{column(groups, 'group')} = t.{group} "
            who = f"ug.{column(groups, 'user')} = %s"
        params.append("user")
        target = meta.get_field("content_object")
        if isinstance(target, models.ForeignKey):  # a direct-foreign-key permission model
            where = f"t.{column(meta, 'content_object')} = %s"
            params.append("pk")
        else:  # guardian's generic model: the content type and the pk as text
            where = f"t.{q('content_type_id')} = %s AND t.{q('object_pk')} = %s"
            params += ["content_type", "pk_text"]
        parts.append(
            f"SELECT 'p', p.{q('codename')}, NULL, NULL FROM {q(meta.db_table)} t "
            f"JOIN {permission} p ON p.{q('id')} = t.{column(meta, 'permission')} {join}"
            f"WHERE {who} AND {where}"
        )
    return "\nUNION ALL\n".join(parts), tuple(params)


def parent_state(user: Any, model: type[models.Model], pk: Any, streams: list[str]) -> ParentState:
    """Whether `model` row `pk` exists, `user`'s guardian permissions on it (direct and
    through groups, all of them for a superuser, none for an inactive user, as guardian's
    `ObjectPermissionChecker.get_perms`) and the streams' positions, in one SQL statement."""
    from django.contrib.contenttypes.models import ContentType

    nowhere: dict[str, tuple[int, str | None]] = {stream: (0, None) for stream in streams}
    try:
        pk = model._meta.pk.to_python(pk)
    except Exception:
        return ParentState(False, (), nowhere)
    alias = router.db_for_read(model)
    if isinstance(pk, int) and not fits_integer_column(connections[alias], model._meta.pk, pk):
        return ParentState(False, (), nowhere)  # names no row (and would not bind)
    superuser = bool(getattr(user, "is_superuser", False))
    sql, names = _parent_sql(model, alias, len(streams), superuser)
    values = {
        "pk": pk,
        "pk_text": str(pk),
        "user": getattr(user, "pk", None),
        "content_type": ContentType.objects.db_manager(alias).get_for_model(model).pk,  # cached
    }
    with connections[alias].cursor() as cursor:
        cursor.execute(sql, [*streams, *(values[name] for name in names)])
        rows = cursor.fetchall()
    found = {
        name: (seq, epoch if seq else None)  # no events: as stream_positions
        for kind, name, seq, epoch in rows
        if kind == "s" and name is not None
    }
    active = bool(getattr(user, "is_active", False))
    perms = sorted({name for kind, name, _s, _e in rows if kind == "p"}) if active else []
    return ParentState(
        exists=any(row[0] == "s" for row in rows),
        perms=tuple(perms),
        positions={stream: found.get(stream, (0, None)) for stream in streams},
    )


class ConditionalReadMixin:
    """ETag/304 and X-Stream-Position on `list` and `retrieve` of a DRF view (reads only).

    Override `get_streams(obj)` (the streams whose events change what the view returns) and,
    if needed, `get_permission_state(obj)`, `get_version(obj)`, `get_object_state(obj)` and
    `get_list_state()`. `check_if_match(obj)` and `with_position(response, written)` serve a
    view's own write actions.
    """

    request: Any
    kwargs: dict[str, Any]
    #: Whether an object's ETag (reads and `If-Match`) includes its streams' positions. Turn
    #: it off when `get_version(obj)` changes with everything the representation shows (a
    #: version bumped on every save, no related data): then a change to another object of
    #: the same stream leaves this one's tag valid, so writers of two objects of one stream
    #: do not get each other's writes as conflicts (`412`), and an `If-Match` costs no query
    #: for the positions. `X-Stream-Position` is sent either way.
    etag_object_positions = True
    #: Whether a list's ETag includes the listed pks. Turn it off when every change to the
    #: list (create, delete, a move in or out) is an event on its streams: one query less.
    etag_lists_pks = True
    #: For a list nested under a guardian-protected object: see `ListParent`. The list is
    #: then 404 unless the parent exists and the user has `permission` on it (the same
    #: answer for both, so existence does not leak), checked in the query that reads the
    #: positions; `check_list_permissions` is not called.
    list_parent: ListParent | None = None

    # -- hooks ------------------------------------------------------------------------------

    def get_streams(self, obj: Any = None) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} must define get_streams()")

    def get_version(self, obj: Any) -> Any:
        """`obj.version` and `obj.updated_at`, those it has: a row deleted and made again
        under its pk (SQLite hands out the highest rowid again) starts at an old version,
        but not at an old time."""
        return [getattr(obj, name) for name in ("version", "updated_at") if hasattr(obj, name)]

    def get_permission_state(self, obj: Any = None) -> Any:
        """What this user may do here; part of the ETag, so permission changes change it."""
        user: Any = self.request.user
        if obj is None:
            return [getattr(user, "pk", None)]
        return [user.pk, sorted(self.object_perms(obj))]

    def object_perms(self, obj: Any) -> set[str]:
        """The user's guardian permissions on `obj`, read once per request (a checker caches)."""
        checker = getattr(self, "_realtime_checker", None)
        if checker is None:
            from guardian.core import ObjectPermissionChecker

            checker = self._realtime_checker = ObjectPermissionChecker(self.request.user)
        return set(checker.get_perms(obj))

    def get_object_state(self, obj: Any) -> Any:
        """Anything else an object's body depends on (the query parameters, by default, as for
        a list): a serializer that reads `?expand=` gives another body, so another tag."""
        return sorted(self.request.query_params.lists())

    def get_list_state(self) -> Any:
        """Anything else a list's content depends on (its filter parameters, by default)."""
        return sorted(self.request.query_params.lists())

    def representation_etag(self, *parts: Any) -> str:
        """The ETag of `parts` in the media type DRF chose for this request: a JSON and an
        HTML (browsable API) answer are different bodies, so they never share a tag."""
        return make_etag(*parts, getattr(self.request, "accepted_media_type", None))

    def listed_pks(self, queryset: Any) -> Any:
        """What a list's ETag holds of its rows: their pks, or for a list over 10,000 rows
        their count and a digest of all of them (read in chunks), so a row that joins or
        leaves anywhere in it (a grant, a revoke) changes the tag."""
        pks = queryset.values_list("pk", flat=True)
        first = list(pks[: _LISTED_PKS + 1])
        if len(first) <= _LISTED_PKS:
            return first
        digest = hashlib.sha256()
        count = 0
        for pk in pks.iterator(chunk_size=2000):
            digest.update(f"{pk},".encode())
            count += 1
        return [count, digest.hexdigest()]

    # -- reads --------------------------------------------------------------------------------

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response: HttpResponseBase = super().dispatch(request, *args, **kwargs)  # type: ignore[misc]
        if response.status_code != status.HTTP_304_NOT_MODIFIED or not isinstance(
            response, Response
        ):
            return response
        # A 304 has no body (RFC 9110, 15.4.5), but DRF renders a Response's None in the
        # negotiated media type, and the browsable API's is a whole HTML page. This covers the
        # 304s a view builds itself too (the notifications' unread count).
        not_modified = HttpResponseNotModified()
        for name, value in response.items():
            if name.lower() != "content-type":
                not_modified[name] = value
        not_modified.cookies = response.cookies
        return not_modified

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        obj = self.get_object()  # type: ignore[attr-defined]  # authenticates, checks permissions
        streams = self.get_streams(obj)
        positions = stream_positions(streams)
        # The data, read after the positions, through the view's own queryset: one deleted
        # (or hidden, as a soft delete does) since `get_object` is a 404, not its old copy
        # and not a DoesNotExist (500).
        try:
            obj.refresh_from_db(from_queryset=self.filter_queryset(self.get_queryset()))  # type: ignore[attr-defined]
        except ObjectDoesNotExist:
            raise NotFound() from None
        etag = self.object_etag(obj, positions)
        if self.check_preconditions(etag):
            return self._conditional(Response(status=status.HTTP_304_NOT_MODIFIED), etag, positions)
        serializer = self.get_serializer(obj)  # type: ignore[attr-defined]
        return self._conditional(Response(serializer.data), etag, positions)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        streams = self.get_streams(None)
        if self.list_parent is not None:
            parent = self.checked_parent(streams)
            positions = parent.positions
            permission_state: Any = [getattr(request.user, "pk", None), list(parent.perms)]
        else:
            self.check_list_permissions()
            positions = stream_positions(streams)
            permission_state = self.get_permission_state(None)
        queryset = None
        pks = None
        if self.etag_lists_pks:
            queryset = self.filter_queryset(self.get_queryset())  # type: ignore[attr-defined]
            pks = self.listed_pks(queryset)
        etag = self.representation_etag(positions, permission_state, self.get_list_state(), pks)
        if self.check_preconditions(etag):
            return self._conditional(Response(status=status.HTTP_304_NOT_MODIFIED), etag, positions)
        if queryset is None:  # the queryset is not even built for a 304
            queryset = self.filter_queryset(self.get_queryset())  # type: ignore[attr-defined]
        page = self.paginate_queryset(queryset)  # type: ignore[attr-defined]
        if page is not None:
            serializer = self.get_serializer(page, many=True)  # type: ignore[attr-defined]
            response = self.get_paginated_response(serializer.data)  # type: ignore[attr-defined]
        else:
            response = Response(self.get_serializer(queryset, many=True).data)  # type: ignore[attr-defined]
        return self._conditional(response, etag, positions)

    def check_list_permissions(self) -> None:
        """Checks a list needs beyond DRF's (e.g. access to the parent object)."""

    def checked_parent(self, streams: Sequence[str] | None = None) -> ParentState:
        """`list_parent`'s state for this request, read once; `NotFound` unless it exists
        and the user has its `permission`."""
        cached: ParentState | None = getattr(self, "_realtime_parent", None)
        if cached is not None:
            return cached
        parent = self.list_parent
        if parent is None:
            raise TypeError(f"{type(self).__name__} has no list_parent")
        state = parent_state(
            self.request.user,
            parent.model,
            self.kwargs.get(parent.kwarg),
            self.get_streams(None) if streams is None else list(streams),
        )
        if not state.exists or parent.permission not in state.perms:
            raise NotFound()
        self._realtime_parent = state
        return state

    def _conditional(
        self, response: Response, etag: str, positions: dict[str, tuple[int, str | None]]
    ) -> Response:
        response["ETag"] = etag
        response["X-Stream-Position"] = header(_seqs(positions))
        response["Cache-Control"] = "private, no-cache"
        response["Vary"] = "Cookie, Authorization, Accept"
        return response

    # -- preconditions, and helpers for writes ------------------------------------------------

    def check_preconditions(self, etag: str) -> bool:
        """RFC 9110, 13.2.2, for a resource whose tag is `etag`: raise `PreconditionFailed` when
        If-Match names none of its state, or a write's If-None-Match names it; return whether
        a read's If-None-Match names it (a 304).

        Steps 2 and 4 need a Last-Modified, which these resources do not send; Django's
        `get_conditional_response` would answer any If-Unmodified-Since with 412 for want of
        one, where 13.1.4 says to ignore it.
        """
        headers = self.request.headers
        if_match = headers.get("If-Match")
        if if_match and not etag_matches(if_match, etag, weak=False, state=True):
            raise PreconditionFailed()
        if_none_match = headers.get("If-None-Match")
        if self.request.method in ("GET", "HEAD"):
            return etag_matches(if_none_match, etag)
        if etag_matches(if_none_match, etag, state=True):
            raise PreconditionFailed(_NONE_MATCHED)
        return False

    def check_if_match(self, obj: Any) -> None:
        """Raise `PreconditionFailed` (412) unless a write's If-Match and If-None-Match allow it
        for `obj` as it is now (see `check_preconditions`)."""
        headers = self.request.headers
        if not (headers.get("If-Match") or headers.get("If-None-Match")):
            return
        positions = stream_positions(self.get_streams(obj)) if self.etag_object_positions else {}
        self.check_preconditions(self.object_etag(obj, positions))

    def object_etag(self, obj: Any, positions: Any) -> str:
        """The ETag of `obj` as this request represents it: `"<state>.<representation>"`.

        The state is the object's (`positions` of its streams, its version, the user's
        permissions, its pk), the representation the body's (`get_object_state(obj)` and the
        media type). `If-None-Match` on a read compares both: a 304 says the client holds this
        body. Every other precondition compares the state: a write (or a read's `If-Match`)
        is about the object, so a tag from any read of it as it is now allows it.
        """
        state = _digest(
            [
                positions if self.etag_object_positions else None,
                self.get_version(obj),
                self.get_permission_state(obj),
                obj.pk,
            ]
        )
        representation = _digest(
            [self.get_object_state(obj), getattr(self.request, "accepted_media_type", None)]
        )
        return f'"{state[:32]}.{representation[:16]}"'

    def with_position(self, response: Response, written: dict[str, int]) -> Response:
        """Set `X-Stream-Position` to the positions of the events a write caused."""
        if written:
            response["X-Stream-Position"] = header(written)
        return response


class RealtimeResourceMixin(ConditionalReadMixin):
    """ETag/304, If-Match/412, Idempotency-Key and X-Stream-Position for a DRF view.

    `ConditionalReadMixin`'s reads, plus `update`, `destroy` and `create` wrapped with the
    If-Match precondition, the written positions and (for `create`) Idempotency-Key. Use it
    with DRF's create, update and destroy mixins (or a `ModelViewSet`).
    """

    _realtime_locking = False
    _realtime_object: Any = None
    _realtime_lock_later = False

    # -- writes -------------------------------------------------------------------------------

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        with transaction.atomic(), collect_positions() as written:
            self.check_if_match(self.locked_object())
            response: Response = super().update(request, *args, **kwargs)  # type: ignore[misc]
        return self.with_position(response, written)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        with transaction.atomic(), collect_positions() as written:
            obj = self.locked_object()
            self.check_if_match(obj)
            self.perform_destroy(obj)  # type: ignore[attr-defined]
        return self.with_position(Response(status=status.HTTP_204_NO_CONTENT), written)

    def locked_object(self) -> Any:
        """`get_object()` with its row locked until the transaction ends (call it in one).

        Under READ COMMITTED, two writers holding the same ETag would otherwise both pass
        `check_if_match` and the second would overwrite the first; locked, the second waits
        here, then reads the first's positions and fails the check. (SQLite ignores the lock:
        its IMMEDIATE transactions already run one writer at a time.)
        """
        self._realtime_locking = True
        obj = self.get_object()
        if self._realtime_lock_later:
            # A queryset that cannot take FOR UPDATE itself (DISTINCT, GROUP BY, aggregates:
            # PostgreSQL refuses them): lock the row by its pk, and read it again locked.
            manager = type(obj)._default_manager.db_manager(obj._state.db)
            list(manager.select_for_update().filter(pk=obj.pk).values_list("pk"))
            obj.refresh_from_db()
        self._realtime_object = obj
        return obj

    def get_object(self) -> Any:
        # The locked object serves DRF's own `get_object()` in update(): one read, not two.
        if self._realtime_object is not None:
            return self._realtime_object
        return super().get_object()  # type: ignore[misc]

    def filter_queryset(self, queryset: models.QuerySet[Any]) -> models.QuerySet[Any]:
        # The last step of DRF's `get_object()` before the lookup, and one that views rarely
        # override (unlike `get_queryset`), so the lock reaches every view's queryset.
        queryset = super().filter_queryset(queryset)  # type: ignore[misc]
        if not self._realtime_locking:
            return queryset
        query = queryset.query
        if (
            query.distinct
            or query.group_by is not None
            or any(getattr(a, "contains_aggregate", False) for a in query.annotations.values())
        ):
            self._realtime_lock_later = True  # see locked_object
            return queryset
        # Only this row: not the rows of a select_related join (nor its nullable side).
        of = ("self",) if connections[queryset.db].features.has_select_for_update_of else ()
        return queryset.select_for_update(of=of)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = request.headers.get("Idempotency-Key")
        if key and len(key) > 128:
            return Response(
                {"detail": "Idempotency-Key is limited to 128 characters."},
                status=status.HTTP_400_BAD_REQUEST,
            )
        with transaction.atomic():
            record = self._claim(key) if key else None
            if isinstance(record, Response):
                return record
            with collect_positions() as written:
                response: Response = super().create(request, *args, **kwargs)  # type: ignore[misc]
            response = self.with_position(response, written)
            if record is not None:
                self._remember(record, response)
        return response

    # -- idempotency ----------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        request = self.request
        body = json.dumps(request.data, sort_keys=True, default=str)
        return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()

    def _claim(self, key: str) -> Any:
        from .models import IdempotencyRecord

        user: Any = self.request.user
        ttl = dt.timedelta(seconds=float(realtime_settings.IDEMPOTENCY_TTL))
        IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - ttl).delete()
        fingerprint = self._fingerprint()
        try:
            with transaction.atomic():
                return IdempotencyRecord.objects.create(user=user, key=key, fingerprint=fingerprint)
        except IntegrityError:
            # The key is taken by a committed request: a concurrent retry's insert waits on
            # the unique key until the first commits (its row then holds its answer, written
            # in the same transaction) or rolls back (the insert then succeeds).
            pass
        first = IdempotencyRecord.objects.select_for_update().get(user=user, key=key)
        if first.fingerprint != fingerprint:
            raise IdempotencyMismatch()
        replay = Response(json.loads(first.body) if first.body else None, status=first.status)
        for name, value in first.headers.items():
            replay[name] = value
        replay["Idempotent-Replayed"] = "true"
        return replay

    def _remember(self, record: Any, response: Response) -> None:
        record.status = response.status_code
        record.body = json.dumps(response.data, default=str) if response.data is not None else ""
        record.headers = {h: response[h] for h in _REPLAYED_HEADERS if response.has_header(h)}
        record.save(update_fields=["status", "body", "headers"])
