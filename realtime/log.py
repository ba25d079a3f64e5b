"""Appending to the event log in the writer's transaction, publishing on commit, relay and prune."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connections, router, transaction
from django.db.models import F, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from .conf import realtime_settings
from .context import get_correlation_id, new_correlation_id, note_position
from .events import Envelope, dumps, is_valid_type, variant_key
from .models import Event, Stream
from .policies import is_valid_audience
from .publisher import LAYER_MESSAGE_TYPE, Outgoing, publisher
from .streams import group_name, parse_stream

logger = logging.getLogger("realtime.log")


@dataclass(frozen=True)
class Pending:
    """An event to append: its stream, primary type and data, and other versions."""

    stream: str
    type: str
    data: Any
    variants: dict[str, tuple[str, Any]]


def _correlation_id(using: str) -> str:
    """The work's correlation id; outside one (a shell, a worker without
    `realtime.correlation()`), one of the transaction's own, shared by all its events."""
    given = get_correlation_id()
    if given:
        return given
    connection = transaction.get_connection(using)
    # The transaction's id lives as long as a no-op commit hook of its own: a commit or a
    # rollback drops the hook (a savepoint rollback too, if the hook was added inside it).
    # Its place in the hook list is kept, so the check is O(1) whatever the transaction holds.
    held = getattr(connection, "_realtime_correlation", None)
    hooks = connection.run_on_commit
    if held is not None:
        place, kept, correlation_id = held
        if place < len(hooks) and hooks[place][1] is kept:
            return str(correlation_id)

    def marker() -> None:
        """Ends the transaction's correlation id (never does anything)."""

    correlation_id = new_correlation_id()
    connection._realtime_correlation = (len(hooks), marker, correlation_id)  # type: ignore[attr-defined]
    transaction.on_commit(marker, using=using)
    return correlation_id


def append(pending: Sequence[Pending], *, using: str | None = None) -> list[Envelope]:
    """Log events in the current transaction (one of its own if none) and publish them on commit.

    Each event takes the next `seq` of its stream under a row lock on the `Stream` row, so seqs
    are gapless and in commit order. Nothing is published if the transaction rolls back.
    """
    if not pending:
        return []
    using = using or router.db_for_write(Event)
    envelopes: list[Envelope] = []
    with transaction.atomic(using=using, savepoint=False):
        correlation_id = _correlation_id(using)
        inserted = [_insert_checked(item, correlation_id, using) for item in pending]
        for (_pk, seq, event_id, timestamp), item in zip(inserted, pending, strict=True):
            envelopes.append(
                Envelope(
                    stream=item.stream,
                    seq=seq,
                    event_id=event_id,
                    type=item.type,
                    timestamp=timestamp,
                    correlation_id=correlation_id,
                    data=item.data,
                    variants=dict(item.variants),
                )
            )
        for envelope in envelopes:
            note_position(envelope.stream, envelope.seq)
        pks = [row[0] for row in inserted]
        _publish_on_commit(envelopes, pks, using)
    return envelopes


def _insert_checked(
    item: Pending, correlation_id: str, using: str
) -> tuple[int, int, uuid.UUID, Any]:
    try:
        return _insert(item, correlation_id, using)
    except ValueError as exc:  # from the encoder, before any SQL: NaN or an infinity
        raise ValueError(f"event data for {item.stream} ({item.type}) is not JSON: {exc}") from exc


def _insert(item: Pending, correlation_id: str, using: str) -> tuple[int, int, uuid.UUID, Any]:
    """Take the stream's next seq and insert the event row; return (pk, seq, eventId, time)."""
    connection = connections[using]
    event_id = uuid.uuid4()
    timestamp = timezone.now()
    variants = {v: {"type": t, "data": d} for v, (t, d) in item.variants.items()}
    if connection.vendor == "postgresql":
        # One statement locks the stream row, advances it and inserts the event.
        row = _insert_postgresql(connection, item, event_id, timestamp, correlation_id, variants)
        if row is not None:
            return row[0], row[1], event_id, timestamp
        _create_stream(item.stream, using)
        row = _insert_postgresql(connection, item, event_id, timestamp, correlation_id, variants)
        assert row is not None
        return row[0], row[1], event_id, timestamp
    stream_pk, seq = _next_seq(item.stream, using)
    if connection.vendor == "sqlite" and connection.features.can_return_columns_from_insert:
        values = _prepared(connection, event_id, timestamp, item.data, variants)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {_EVENT} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL) "
                "RETURNING id",
                [stream_pk, seq, values[0], item.type, values[1], correlation_id, *values[2:]],
            )
            return int(cursor.fetchone()[0]), seq, event_id, timestamp
    event = Event(
        stream_id=stream_pk,
        seq=seq,
        event_id=event_id,
        type=item.type,
        timestamp=timestamp,
        correlation_id=correlation_id,
        data=item.data,
        variants=variants,
    )
    event.save(using=using, force_insert=True)
    return event.pk, seq, event_id, timestamp


_EVENT = f'"{Event._meta.db_table}"'
_COLUMNS = (
    '"stream_id", "seq", "event_id", "type", "timestamp", "correlation_id", "data", '
    '"variants", "published_at"'
)


def _prepared(
    connection: Any, event_id: uuid.UUID, timestamp: Any, data: Any, variants: Any
) -> list[Any]:
    """Column values as the backend wants them, converted by the model's own fields."""
    fields = {f.name: f for f in Event._meta.concrete_fields}
    return [
        fields["event_id"].get_db_prep_value(event_id, connection),
        fields["timestamp"].get_db_prep_value(timestamp, connection),
        fields["data"].get_db_prep_value(data, connection),
        fields["variants"].get_db_prep_value(variants, connection),
    ]


def _insert_postgresql(
    connection: Any,
    item: Pending,
    event_id: uuid.UUID,
    timestamp: Any,
    correlation_id: str,
    variants: Any,
) -> tuple[int, int] | None:
    values = _prepared(connection, event_id, timestamp, item.data, variants)
    with connection.cursor() as cursor:
        cursor.execute(
            f'WITH s AS (UPDATE "{Stream._meta.db_table}" SET "last_seq" = "last_seq" + 1 '
            'WHERE "name" = %s RETURNING "id", "last_seq") '
            f"INSERT INTO {_EVENT} ({_COLUMNS}) "
            "SELECT s.id, s.last_seq, %s::uuid, %s, %s::timestamptz, %s, %s::jsonb, %s::jsonb, "
            'NULL FROM s RETURNING "id", "seq"',
            [item.stream, values[0], item.type, values[1], correlation_id, *values[2:]],
        )
        row = cursor.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _create_stream(stream: str, using: str) -> None:
    # First event of this stream: create its row (a concurrent creator may win).
    Stream.objects.using(using).bulk_create([Stream(name=stream)], ignore_conflicts=True)


def _publish_on_commit(envelopes: list[Envelope], pks: list[int], using: str) -> None:
    # The frames are serialized now, as the rows were written: a caller that changes its
    # data before the commit must not make the live frame differ from the logged event.
    items = [outgoing(env, pk, using) for env, pk in zip(envelopes, pks, strict=True)]

    # A function, not a partial: Django logs a robust hook's failure by its __qualname__,
    # which a partial lacks, and the AttributeError would then stop the remaining hooks.
    def publish_committed() -> None:
        publisher.submit(items)

    transaction.on_commit(publish_committed, using=using, robust=True)


def outgoing(envelope: Envelope, event_pk: int, using: str | None = None) -> Outgoing:
    """Build the channel-layer message of an event, its frames serialized once per version;
    `using` is the database whose log holds it."""
    return Outgoing(
        using=using,
        event_pk=event_pk,
        stream=envelope.stream,
        seq=envelope.seq,
        group=group_name(envelope.stream),
        message={
            "type": LAYER_MESSAGE_TYPE,
            "stream": envelope.stream,
            "seq": envelope.seq,
            "eventId": str(envelope.event_id),
            "eventType": envelope.type,
            "frames": envelope.frames(),
        },
    )


def _next_seq(stream: str, using: str) -> tuple[int, int]:
    """Lock the stream's row, advance `last_seq`, and return (stream pk, new seq)."""
    connection = connections[using]
    table = connection.ops.quote_name(Stream._meta.db_table)
    returning = connection.vendor in ("postgresql", "sqlite") and getattr(
        connection.features, "can_return_columns_from_insert", False
    )
    for _attempt in range(2):
        if returning:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {table} SET last_seq = last_seq + 1 WHERE name = %s "
                    "RETURNING id, last_seq",
                    [stream],
                )
                row = cursor.fetchone()
            if row is not None:
                return int(row[0]), int(row[1])
        else:
            found = (
                Stream.objects.using(using)
                .select_for_update()
                .filter(name=stream)
                .values_list("pk", "last_seq")
                .first()
            )
            if found is not None:
                Stream.objects.using(using).filter(pk=found[0]).update(last_seq=found[1] + 1)
                return int(found[0]), int(found[1]) + 1
        _create_stream(stream, using)
    raise RuntimeError(f"could not allocate a seq for stream {stream!r}")


def emit(
    stream: str,
    type: str,
    data: Any = None,
    *,
    variants: dict[str, tuple[str, Any]] | None = None,
    audiences: dict[str, Any] | None = None,
    using: str | None = None,
) -> Envelope:
    """Log and publish one event that is not a model change (or one that sent no signal).

    `variants` are other versions' (type, data), by version (`v2`) or by version and
    audience (`v2/owner`); `audiences` is {audience: data} of this event's own type, for the
    readers whose stream policy puts them in that audience. The event joins the current
    transaction, so it is published only if that commits.
    """
    parse_stream(stream)
    if not is_valid_type(type):
        raise ValueError(
            f"invalid event type {type!r}: expected 'v<N>:<noun>.<action>' such as "
            "'v1:item.updated'"
        )
    variants = dict(variants or {})
    version = type.split(":", 1)[0]
    for audience, audience_data in (audiences or {}).items():
        key = variant_key(version, audience)
        if key in variants:
            raise ValueError(
                f"audience {audience!r} given twice: in audiences and variants[{key!r}]"
            )
        variants[key] = (type, audience_data)
    for key, (variant_type, _data) in variants.items():
        variant_version, _slash, audience = key.partition("/")
        if (
            not is_valid_type(variant_type)
            or not variant_type.startswith(f"{variant_version}:")
            or (_slash and not is_valid_audience(audience))
            or key == version
            # An audience's payload of a version the event has no default payload of would
            # never be picked: a reader of that version gets the primary one.
            or (_slash and variant_version != version and variant_version not in variants)
        ):
            raise ValueError(f"invalid variant {key!r}: {variant_type!r}")
    data = {} if data is None else data
    dumps(data)  # fail here, not after commit, when the data is not JSON-serializable
    for _type, variant_data in variants.values():
        dumps(variant_data)
    return append([Pending(stream, type, data, variants)], using=using)[0]


def emit_many(
    events: Iterable[tuple[str, str, Any]],
    *,
    using: str | None = None,
    batch_size: int = 1000,
) -> list[Envelope]:
    """Log and publish many `(stream, type, data)` events in a bounded number of queries.

    For fan-out writes such as one notification to 10,000 users. Per `batch_size` streams or
    events: one statement finds the stream rows (and two more make and find missing ones), one
    locks them and reads their positions, and one inserts the events; plus one UPDATE per
    distinct number of events a stream gets. The stream rows are locked in primary-key order
    across all batches, so concurrent bulk writers cannot deadlock each other. The events join
    the current transaction and are published after it commits, as with `emit`.
    """
    pending = []
    for stream, type, data in events:
        parse_stream(stream)
        if not is_valid_type(type):
            raise ValueError(f"invalid event type {type!r}: expected 'v<N>:<noun>.<action>'")
        pending.append(Pending(stream, type, {} if data is None else data, {}))
    if not pending:
        return []
    dumps([item.data for item in pending])  # not JSON-serializable: fail before writing
    size = max(1, batch_size)
    using = using or router.db_for_write(Event)
    counts = Counter(item.stream for item in pending)
    # Sorted: missing rows are inserted in one global order, so two writers making the same
    # new streams wait for each other instead of deadlocking (an INSERT ... ON CONFLICT
    # waits on another transaction's uncommitted row of the same name).
    names = sorted(counts)
    with transaction.atomic(using=using, savepoint=False):
        correlation_id = _correlation_id(using)
        rows = _lock_streams(names, size, using)
        by_count: dict[int, list[int]] = {}
        for name, count in counts.items():
            by_count.setdefault(count, []).append(rows[name][0])
        manager = Stream.objects.using(using)
        for count, stream_pks in by_count.items():
            for start in range(0, len(stream_pks), size):
                manager.filter(pk__in=stream_pks[start : start + size]).update(
                    last_seq=F("last_seq") + count
                )
        timestamp = timezone.now()
        next_seq = {name: last_seq for name, (_pk, last_seq) in rows.items()}
        events_rows: list[Event] = []
        envelopes: list[Envelope] = []
        for item in pending:
            next_seq[item.stream] += 1
            event = Event(
                stream_id=rows[item.stream][0],
                seq=next_seq[item.stream],
                event_id=uuid.uuid4(),
                type=item.type,
                timestamp=timestamp,
                correlation_id=correlation_id,
                data=item.data,
                variants={},
            )
            events_rows.append(event)
            envelopes.append(Envelope.from_row(event, stream=item.stream))
        Event.objects.using(using).bulk_create(events_rows, batch_size=size)
        pks = _event_pks(events_rows, size, using)
        for envelope in envelopes:
            note_position(envelope.stream, envelope.seq)
        _publish_on_commit(envelopes, pks, using)
    return envelopes


def lock_streams(names: Iterable[str], *, using: str | None = None) -> None:
    """Lock these streams' rows (made if missing) until the current transaction ends.

    For a writer whose event data depends on what other writers of the same streams do
    (a count): read it after this, and a concurrent writer's commit is seen, not raced.
    """
    using = using or router.db_for_write(Event)
    if not transaction.get_connection(using).in_atomic_block:
        raise RuntimeError("lock_streams() needs a transaction (transaction.atomic)")
    _lock_streams(sorted(set(names)), 1000, using)


def _lock_streams(names: list[str], size: int, using: str) -> dict[str, tuple[int, int]]:
    """Create missing stream rows, then lock all in pk order; return {name: (pk, last_seq)}."""
    manager = Stream.objects.using(using)
    ids: dict[str, int] = {}
    for start in range(0, len(names), size):
        chunk = names[start : start + size]
        ids.update(manager.filter(name__in=chunk).values_list("name", "pk"))
        missing = [name for name in chunk if name not in ids]
        if missing:  # first events of these streams (a concurrent writer may create them too)
            manager.bulk_create([Stream(name=name) for name in missing], ignore_conflicts=True)
            ids.update(manager.filter(name__in=missing).values_list("name", "pk"))
    ordered = sorted(ids.values())
    lock = connections[using].features.has_select_for_update
    rows: dict[str, tuple[int, int]] = {}
    for start in range(0, len(ordered), size):
        query = manager.filter(pk__in=ordered[start : start + size]).order_by("pk")
        if lock:
            query = query.select_for_update()
        for pk, name, last_seq in query.values_list("pk", "name", "last_seq"):
            rows[name] = (pk, last_seq)
    return rows


def _event_pks(events: list[Event], size: int, using: str) -> list[int]:
    missing = [event for event in events if event.pk is None]  # a backend returning no pks
    for start in range(0, len(missing), size):
        chunk = missing[start : start + size]
        found = dict(
            Event.objects.using(using)
            .filter(event_id__in=[event.event_id for event in chunk])
            .values_list("event_id", "pk")
        )
        for event in chunk:
            event.pk = found[event.event_id]
    return [int(event.pk) for event in events]


# -- relay -------------------------------------------------------------------------------


@dataclass
class RelayResult:
    """What one relay pass did."""

    found: int = 0
    published: int = 0
    failed: int = 0


def relay_once(
    *,
    grace: float | None = None,
    limit: int | None = None,
    timeout: float | None = None,
    using: str | None = None,
) -> RelayResult:
    """Publish committed events that were never published, oldest stream positions first.

    A layer failure ends the pass. A stream whose event the layer refuses is left (its later
    events wait behind it, in order) and the rest of the pass's `limit` goes to other streams.
    """
    grace = realtime_settings.RELAY_GRACE if grace is None else grace
    limit = realtime_settings.RELAY_BATCH if limit is None else limit
    using = using or router.db_for_write(Event)
    cutoff = timezone.now() - dt.timedelta(seconds=grace)
    result = RelayResult()
    left_out: set[int] = set()  # streams refused in this pass
    budget = limit
    while budget > 0:
        tried, refused, layer_failed = _relay_rows(result, cutoff, budget, left_out, timeout, using)
        if not refused or layer_failed:  # a layer that failed is not tried again this pass
            break
        left_out |= refused
        budget -= tried
    return result


def _relay_rows(
    result: RelayResult,
    cutoff: Any,
    limit: int,
    left_out: set[int],
    timeout: float | None,
    using: str,
) -> tuple[int, set[int], bool]:
    """One read and publish of up to `limit` unpublished events, outside streams `left_out`.

    Adds to `result`; returns (the events tried, the ids of the streams the layer refused,
    whether the layer itself failed).
    """
    connection = connections[using]
    # Two relays never take the same rows where the database can skip locked ones; that
    # lock lasts as long as the publish. Elsewhere (SQLite) nothing is locked: holding a
    # transaction open while publishing would keep every writer waiting on the database.
    locking = connection.features.has_select_for_update_skip_locked
    with transaction.atomic(using=using) if locking else contextlib.nullcontext():
        query = (
            Event.objects.using(using)
            .filter(published_at__isnull=True, timestamp__lte=cutoff)
            .exclude(stream_id__in=left_out)
            .select_related("stream")
            .order_by("stream_id", "seq")
        )
        if locking:
            # Writers' Stream rows stay unlocked.
            query = query.select_for_update(skip_locked=True, of=("self",))
        rows = list(query[:limit])
        result.found += len(rows)
        if not rows:
            return 0, set(), False
        items = [outgoing(Envelope.from_row(row), row.pk, using) for row in rows]
        refused_streams: set[str] = set()
        sent = publisher.publish_now(items, timeout=timeout, refused=refused_streams)
        if sent:
            Event.objects.using(using).filter(pk__in=sent).update(published_at=timezone.now())
        result.published += len(sent)
        result.failed += len(rows) - len(sent)
    refused = {row.stream_id for row in rows if row.stream.name in refused_streams}
    # A refused stream's rows after the refused one were not tried: all of its rows but one
    # are counted as untried (an estimate; it only sizes the rest of the pass, and at least
    # one row per refused stream counts, so the pass's loop ends). Rows after a layer
    # failure were not tried either, but then nothing was refused and the pass ends anyway.
    untried = sum(1 for row in rows if row.stream_id in refused) - len(refused)
    done = set(sent)
    layer_failed = any(row.pk not in done and row.stream_id not in refused for row in rows)
    return len(rows) - untried, refused, layer_failed


# -- retention ---------------------------------------------------------------------------


def prune(
    *,
    max_age: float | None = None,
    max_events: int | None = None,
    batch: int | None = None,
    using: str | None = None,
    progress: Any = None,
) -> int:
    """Delete published events older than `max_age` seconds or beyond `max_events` per stream."""
    batch = batch or realtime_settings.PRUNE_BATCH
    using = using or router.db_for_write(Event)
    deleted = 0
    # Only published events below each stream's first unpublished one: deleting above it
    # would leave a hole that a resume could not see.
    first_unpublished = (
        Event.objects.using(using)
        .filter(stream=OuterRef("stream"), published_at__isnull=True)
        .order_by("seq")
        .values("seq")[:1]
    )
    published = (
        Event.objects.using(using)
        .filter(published_at__isnull=False)
        .filter(seq__lt=Coalesce(Subquery(first_unpublished), Value(2**62)))
    )
    if max_age is not None:
        cutoff = timezone.now() - dt.timedelta(seconds=max_age)
        # Only below each stream's first event at or after the cutoff: timestamps are taken
        # before the stream lock (and on several nodes' clocks), so they need not rise with
        # seq, and deleting an old event above a young one would leave a hole.
        first_young = (
            Event.objects.using(using)
            .filter(stream=OuterRef("stream"), timestamp__gte=cutoff)
            .order_by("seq")
            .values("seq")[:1]
        )
        old = published.filter(
            timestamp__lt=cutoff, seq__lt=Coalesce(Subquery(first_young), Value(2**62))
        )
        deleted += _delete_in_batches(old, batch, progress)
    from .policies import stream_kinds

    # A stream kind's policy may keep more or fewer events than the default.
    limits = {
        kind: policy.retention
        for kind in stream_kinds.kinds()
        if (policy := stream_kinds.get(kind)) is not None and policy.retention is not None
    }
    if max_events is not None or limits:
        smallest = min([n for n in [max_events, *limits.values()] if n is not None])
        for stream in Stream.objects.using(using).filter(last_seq__gt=smallest).iterator():
            keep = limits.get(stream.name.split(":", 1)[0], max_events)
            if keep is None:
                continue
            doomed = published.filter(stream=stream, seq__lte=stream.last_seq - keep)
            deleted += _delete_in_batches(doomed, batch, progress, label=stream.name)
    return deleted


def _delete_in_batches(query: Any, batch: int, progress: Any, label: str = "") -> int:
    total = 0
    while True:
        pks = list(query.order_by("pk").values_list("pk", flat=True)[:batch])
        if not pks:
            return total
        count, _ = Event.objects.using(query.db).filter(pk__in=pks).delete()
        total += count
        if progress is not None:
            progress(total, label)


def positions(streams: Iterable[str], *, using: str | None = None) -> dict[str, tuple[int, str]]:
    """Return {stream: (last_seq, epoch)} for streams that have a log."""
    using = using or router.db_for_read(Stream)
    rows = Stream.objects.using(using).filter(name__in=list(streams))
    return {row.name: (row.last_seq, row.epoch) for row in rows.only("name", "last_seq", "epoch")}
