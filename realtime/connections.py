"""`Connection` rows: written on connect, removed on disconnect, swept when a node goes silent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from django.db import connections, router, transaction
from django.utils import timezone

from .conf import realtime_settings
from .models import Connection


def open_connection(
    *,
    connection_id: str,
    user: Any,
    node: str,
    transport: str,
    client_version: str,
    remote_addr: str,
    tenant: str,
    limit: int | None = None,
) -> bool:
    """Write the connection's row; with `limit`, only if the user has fewer rows than that.

    The count and the insert run in one transaction holding a lock on the user's row, so
    connects racing on any number of nodes cannot all pass the limit. Returns whether the
    row was written.
    """
    owner = user if user is not None and user.is_authenticated else None
    using = router.db_for_write(Connection)
    with transaction.atomic(using=using):
        if limit is not None and owner is not None:
            _lock_user(owner, using)
            # Rows a live node touched lately: a dead node's stay until a sweep, which may
            # never come when the nodes left hold no sockets (they sweep as they touch theirs).
            live = Connection.objects.using(using).filter(user=owner, last_seen__gte=_cutoff())
            if live.count() >= limit:
                return False
        Connection.objects.using(using).create(
            id=connection_id,
            user=owner,
            tenant=tenant,
            node=node,
            transport=transport,
            client_version=client_version[:32],
            remote_addr=remote_addr[:64],
            last_seen=timezone.now(),
        )
    return True


def _lock_user(user: Any, using: str) -> None:
    # FOR NO KEY UPDATE where the database has it: it serializes connects of this user without
    # blocking inserts of rows that merely reference the user. SQLite has no row locks; its
    # write transactions are serialized (the demo begins them IMMEDIATE).
    no_key = connections[using].features.has_select_for_no_key_update
    locked = user._meta.model._default_manager.using(using).select_for_update(no_key=no_key)
    list(locked.filter(pk=user.pk).values_list("pk", flat=True))


def close_connection(connection_id: str) -> None:
    Connection.objects.filter(pk=connection_id).delete()


def set_subscriptions(connection_id: str, streams: list[str]) -> None:
    Connection.objects.filter(pk=connection_id).update(subscriptions=streams)


def count_for_user(user: Any) -> int:
    """The user's connections that a live node touched lately (see `open_connection`)."""
    return Connection.objects.filter(user=user, last_seen__gte=_cutoff()).count()


def touch_node(node: str, connection_ids: Iterable[str]) -> int:
    """Mark the connections this node holds (`connection_ids`) as seen now, and sweep the
    rows not seen for long: those of silent nodes, and this node's rows it no longer holds
    (a socket whose cleanup never ran), which touching every row of the node would keep."""
    now = timezone.now()
    ids = sorted(connection_ids)
    touched = 0
    for start in range(0, len(ids), 500):  # bounded statements, whatever the socket count
        chunk = ids[start : start + 500]
        touched += Connection.objects.filter(node=node, pk__in=chunk).update(last_seen=now)
    sweep(now=now)
    return touched


def sweep(*, now: dt.datetime | None = None) -> int:
    """Delete connection rows not seen for REALTIME['CONNECTION_SWEEP_AFTER'] seconds."""
    count, _ = Connection.objects.filter(last_seen__lt=_cutoff(now)).delete()
    return count


def _cutoff(now: dt.datetime | None = None) -> dt.datetime:
    """Rows last seen before this belong to a node that stopped touching them."""
    now = now or timezone.now()
    return now - dt.timedelta(seconds=float(realtime_settings.CONNECTION_SWEEP_AFTER))


def resolve_tenant(user: Any) -> str:
    from django.utils.module_loading import import_string

    resolver = realtime_settings.TENANT_RESOLVER
    if resolver is None or user is None or not user.is_authenticated:
        return ""
    if isinstance(resolver, str):
        resolver = import_string(resolver)
    value = resolver(user)
    return "" if value is None else str(value)[:128]
