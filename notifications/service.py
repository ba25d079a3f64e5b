"""Making notifications and changing their read state, each change an event on `user:<id>`.

Everything here goes through realtime's public API: the rows and their events are written in
one transaction, and the events are published after it commits, so a recipient's tabs learn
of a notification (and of every change to the unread count) in order, with replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import models, router, transaction
from django.db.models import Count
from django.utils import timezone

import realtime
from realtime.context import collect_positions
from realtime.events import dumps, format_timestamp
from realtime.log import lock_streams
from realtime.models import Event

from .models import LEVELS, Notification, Preference

CREATED = "v1:notification.created"
READ = "v1:notification.read"
DELETED = "v1:notification.deleted"
BATCH = 1000


def stream_of(user: Any) -> str:
    """The private stream a user's notifications travel on."""
    return f"user:{getattr(user, 'pk', user)}"


def _ref(obj: Any) -> tuple[ContentType | None, str, dict[str, Any] | None]:
    if obj is None:
        return None, "", None
    if not isinstance(obj, models.Model) or obj.pk is None:
        raise TypeError(f"{obj!r} is not a saved model instance")
    content_type = ContentType.objects.get_for_model(obj)
    label = f"{content_type.app_label}.{content_type.model}"
    return content_type, str(obj.pk), {"type": label, "id": str(obj.pk), "repr": str(obj)[:200]}


def _recipient_ids(recipients: Any) -> list[Any]:
    """The distinct pks of the recipients, checked to be saved users, in the given order."""
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    if isinstance(recipients, models.Model):
        recipients = [recipients]
    if isinstance(recipients, models.QuerySet):
        if not issubclass(recipients.model, user_model):
            raise TypeError(f"recipients: a queryset of {recipients.model.__name__} is not a user")
        values: Iterable[Any] = recipients.values_list("pk", flat=True)
    elif isinstance(recipients, Iterable) and not isinstance(recipients, (str, bytes)):
        values = recipients
    else:
        raise TypeError("recipients must be a user, a queryset of users or an iterable of them")
    pk_field = user_model._meta.pk
    seen: dict[Any, None] = {}
    for value in values:
        if isinstance(value, models.Model):
            if not isinstance(value, user_model):
                raise TypeError(f"recipient {value!r} is not a user")
            value = value.pk
            if value is None:
                raise TypeError("a recipient is not saved (no pk)")
        elif value is None:
            raise TypeError("a recipient is not saved (no pk)")
        elif isinstance(value, bool):  # to_python would take True for pk 1
            raise TypeError(f"recipient {value!r} is not a valid user pk")
        try:  # "7" and 7 are one user
            seen.setdefault(pk_field.to_python(value), None)
        except Exception:
            raise TypeError(f"recipient {value!r} is not a valid user pk") from None
    ids = list(seen)
    if not isinstance(recipients, models.QuerySet):
        # A pk (or a deleted user's object) naming no user would fail its foreign key only at
        # the commit, after the rows and events were written: the caller's whole transaction.
        users = user_model._base_manager.db_manager(router.db_for_write(Notification))
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            found = set(users.filter(pk__in=chunk).values_list("pk", flat=True))
            missing = [pk for pk in chunk if pk not in found]
            if missing:
                raise ValueError(f"recipients: no user has pk {missing[0]}")
    return ids


def represent(notification: Notification, unread_count: int | None = None) -> dict[str, Any]:
    """The notification as the REST API and its events show it."""
    refs = notification.refs or {}
    data: dict[str, Any] = {
        "id": notification.pk,
        "verb": notification.verb,
        "level": notification.level,
        "actor": refs.get("actor"),
        "target": refs.get("target"),
        "action_object": refs.get("action_object"),
        "data": notification.data,
        "created_at": format_timestamp(notification.created_at),
        "read_at": format_timestamp(notification.read_at) if notification.read_at else None,
        "unread": notification.read_at is None,
    }
    if unread_count is not None:
        data["unread_count"] = unread_count
    return data


def notify(
    recipients: Any,
    verb: str,
    actor: Any = None,
    target: Any = None,
    action_object: Any = None,
    data: dict[str, Any] | None = None,
    level: str = "info",
    *,
    batch_size: int = BATCH,
) -> list[Notification]:
    """Notify users: store one row each and push `v1:notification.created` to each after commit.

    `recipients` is a user, a queryset of users or an iterable of users (or their pks);
    duplicates are notified once. Rows and events are written in batches (a few queries per
    `batch_size` recipients, none per recipient), in one transaction: all or nothing.
    A recipient who muted this verb or level gets the row but no live event.
    """
    if not isinstance(verb, str) or not verb.strip() or len(verb) > 255:
        raise ValueError("verb must be a non-empty string of at most 255 characters")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise TypeError("data must be a dict")
    refs: dict[str, Any] = {}
    related: dict[str, Any] = {}
    for name, obj in (("actor", actor), ("target", target), ("action_object", action_object)):
        content_type, object_id, ref = _ref(obj)
        related[f"{name}_content_type"] = content_type
        related[f"{name}_object_id"] = object_id
        if ref is not None:
            refs[name] = ref
    dumps(data)  # not JSON-serializable: fail before writing anything
    ids = _recipient_ids(recipients)
    created: list[Notification] = []
    with _atomic():
        # Every recipient's stream, locked up front in one order (the streams' pks): batches
        # locking theirs one after the other, in the caller's order, could deadlock with
        # another bulk notify to the same users in another order.
        lock_streams(stream_of(pk) for pk in ids)
        for start in range(0, len(ids), max(1, batch_size)):
            chunk = ids[start : start + max(1, batch_size)]
            created += _notify_chunk(chunk, verb, level, data, refs, related)
    return created


def _notify_chunk(
    ids: list[int],
    verb: str,
    level: str,
    data: dict[str, Any],
    refs: dict[str, Any],
    related: dict[str, Any],
) -> list[Notification]:
    now = timezone.now()
    rows = Notification.objects.bulk_create(
        [
            Notification(
                recipient_id=pk,
                verb=verb,
                level=level,
                data=data,
                refs=refs,
                created_at=now,
                **related,
            )
            for pk in ids
        ]
    )
    muted = {
        preference.user_id
        for preference in Preference.objects.filter(user_id__in=ids)
        if preference.mutes(verb, level)
    }
    live = [row for row in rows if row.recipient_id not in muted]
    if live:
        # Counted with the recipients' streams locked: a concurrent writer to them has
        # committed by now, so its notification is counted (READ COMMITTED would miss it).
        lock_streams(stream_of(row.recipient_id) for row in live)
        counts = unread_counts([row.recipient_id for row in live])
        # Recipients' stream positions are theirs: kept out of the writer's X-Stream-Position.
        with collect_positions():
            realtime.emit_many(
                (stream_of(row.recipient_id), CREATED, represent(row, counts[row.recipient_id]))
                for row in live
            )
    return rows


def unread_counts(user_ids: list[int]) -> dict[int, int]:
    """{user pk: unread count} in one query."""
    found = dict(
        Notification.objects.unread()
        .filter(recipient_id__in=user_ids)
        .values("recipient_id")
        .annotate(n=Count("pk"))
        .values_list("recipient_id", "n")
    )
    return {pk: found.get(pk, 0) for pk in user_ids}


def unread_count(user: Any) -> int:
    if user is None or not user.is_authenticated:
        return 0
    return Notification.objects.unread().filter(recipient=user).count()


def _atomic() -> ExitStack:
    """One transaction on the notifications' database and on the event log's, if another."""
    stack = ExitStack()
    for alias in dict.fromkeys([router.db_for_write(Notification), router.db_for_write(Event)]):
        stack.enter_context(transaction.atomic(using=alias))
    return stack


@contextmanager
def changing(user: Any) -> Iterator[None]:
    """A transaction that holds the user's stream lock before it reads or locks their rows.

    Every change to a user's notifications takes that lock first, then their rows: a write
    that locked a row and then asked for the stream deadlocked with a read-all, which holds
    the stream and waits for the rows (PostgreSQL killed one of them: a 500).
    """
    with _atomic():
        lock_streams([stream_of(user)])
        yield


def _lock_recipients(queryset: Any) -> list[Any]:
    """Lock the streams of the queryset's recipients, in pk order; their pks, sorted."""
    user_pks = list(
        queryset.order_by("recipient_id").values_list("recipient_id", flat=True).distinct()
    )
    # All at once, in the streams' order, as notify() takes them: one at a time, in the
    # recipients' order, could deadlock with a bulk notify holding some of them.
    lock_streams(stream_of(pk) for pk in user_pks)
    return user_pks


#: A read-all names the notifications it marked, in its event and its answer, up to this many.
READ_ALL_IDS = 1000
#: The most ids a `read` or `deleted` event names (and a statement lists); more are more events.
IDS_PER_EVENT = 1000


def _changed(user: Any, type: str, ids: list[int], extra: dict[str, Any]) -> None:
    """Emit `type` for the user's `ids`, with the unread count after the change.

    The caller holds the user's stream lock (taken before the rows), so the count sees what
    a notify() racing this one committed.
    """
    pk = getattr(user, "pk", user)
    realtime.emit(
        stream_of(user), type, {"ids": ids, **extra, "unread_count": unread_counts([pk])[pk]}
    )


def _batches(ids: Iterable[int]) -> Iterable[list[int]]:
    """The distinct ids in sorted batches of at most `IDS_PER_EVENT`."""
    ordered = sorted(set(ids))
    for start in range(0, len(ordered), IDS_PER_EVENT):
        yield ordered[start : start + IDS_PER_EVENT]


def set_read(user: Any, ids: Iterable[int], read: bool = True) -> list[int]:
    """Mark some of the user's notifications read or unread (all unread ones: `read_all`).

    Returns the ids that changed; a `v1:notification.read` event carries them (at most
    `IDS_PER_EVENT` an event) and the new unread count, so every tab of the user stays in step.
    """
    if ids is None:
        raise TypeError("set_read() needs the ids; read_all() marks every unread one")
    changed: list[int] = []
    batches = list(_batches(ids))
    if not batches:
        return changed  # no stream to lock (nor to make)
    with changing(user):
        for batch in batches:
            query = Notification.objects.for_user(user).select_for_update()
            query = query.filter(pk__in=batch).filter(read_at__isnull=read)
            marked = sorted(query.values_list("pk", flat=True))
            if marked:
                Notification.objects.filter(pk__in=marked).update(
                    read_at=timezone.now() if read else None
                )
                _changed(user, READ, marked, {"read": read})
                changed += marked
    return changed


def read_all(user: Any) -> dict[str, Any]:
    """Mark every unread notification of the user read, in one UPDATE whatever their number.

    Returns `{"count": n, "ids": [...], "unread_count": m}`, `ids` only when `n` is at most
    `READ_ALL_IDS`, `m` as the event says it (notifications made meanwhile count). The
    `v1:notification.read` event says `"all": true`: every notification of the user before it
    in the stream is read now (a later one comes after it, with its own event).
    """
    stream = stream_of(user)
    with changing(user):  # notify() and other read changes of this user wait, or are in
        now = timezone.now()
        count = Notification.objects.for_user(user).unread().update(read_at=now)
        if not count:
            return {"count": 0, "ids": [], "unread_count": unread_count(user)}
        answer: dict[str, Any] = {"count": count}
        if count <= READ_ALL_IDS:
            marked = Notification.objects.for_user(user).filter(read_at=now)
            answer["ids"] = sorted(marked.values_list("pk", flat=True)[: READ_ALL_IDS + 1])
        answer["unread_count"] = unread_count(user)  # the event's, under the stream lock
        realtime.emit(stream, READ, {"all": True, **answer, "read": True})
    return answer


def soft_delete(user: Any, ids: Iterable[int]) -> list[int]:
    """Hide the user's notifications; a `v1:notification.deleted` event per `IDS_PER_EVENT`."""
    changed: list[int] = []
    batches = list(_batches(ids))
    if not batches:
        return changed
    with changing(user):
        for batch in batches:
            query = Notification.objects.for_user(user).filter(pk__in=batch)
            hidden = sorted(query.select_for_update().values_list("pk", flat=True))
            if hidden:
                Notification.objects.filter(pk__in=hidden).update(deleted_at=timezone.now())
                _changed(user, DELETED, hidden, {})
                changed += hidden
    return changed


def delete_by_admin(queryset: Any) -> int:
    """Delete the given notifications for good; their recipients get `v1:notification.deleted`.

    Only the ones still visible to their recipient are in an event (a soft-deleted one is gone
    from every tab already). Returns how many rows were deleted.
    """
    deleted = 0
    with _atomic():
        # Every recipient's stream before any of their rows, as the API's writes take them.
        _lock_recipients(queryset)
        visible = queryset.visible()
        user_pks = visible.order_by("recipient_id").values_list("recipient_id", flat=True)
        for user_pk in list(user_pks.distinct()):
            pks = visible.filter(recipient_id=user_pk).values_list("pk", flat=True)
            for batch in _batches(pks):
                deleted += Notification.objects.filter(pk__in=batch).delete()[0]
                _changed(user_pk, DELETED, batch, {})
        deleted += queryset.delete()[0]  # the rest: hidden from their users already
    return deleted


def mark_read_by_admin(queryset: Any) -> int:
    """Mark the given notifications read, an event per recipient and 1,000 (the admin's action).

    In one transaction (all or nothing), one recipient at a time: only that recipient's
    selected ids are held in memory, however many the selection has.
    """
    from django.contrib.auth import get_user_model

    selected = queryset.unread()
    total = 0
    with _atomic():
        # Every recipient's stream before any of their rows, as the API's writes take them.
        for user_pk in _lock_recipients(selected):
            user = get_user_model()._default_manager.get(pk=user_pk)
            pks = selected.filter(recipient_id=user_pk).values_list("pk", flat=True)
            total += len(set_read(user, list(pks), read=True))
    return total
