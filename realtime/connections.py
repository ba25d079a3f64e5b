"""`Connection` rows: written on connect, removed on disconnect, swept when a node goes silent."""

from __future__ import annotations

import datetime as dt
from typing import Any

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
) -> None:
    Connection.objects.create(
        id=connection_id,
        user=user if user is not None and user.is_authenticated else None,
        tenant=tenant,
        node=node,
        transport=transport,
        client_version=client_version[:32],
        remote_addr=remote_addr[:64],
        last_seen=timezone.now(),
    )


def close_connection(connection_id: str) -> None:
    Connection.objects.filter(pk=connection_id).delete()


def set_subscriptions(connection_id: str, streams: list[str]) -> None:
    Connection.objects.filter(pk=connection_id).update(subscriptions=streams)


def count_for_user(user: Any) -> int:
    return Connection.objects.filter(user=user).count()


def touch_node(node: str) -> int:
    """Mark this node's connections as seen now, and sweep those of silent nodes."""
    now = timezone.now()
    touched = Connection.objects.filter(node=node).update(last_seen=now)
    sweep(now=now)
    return touched


def sweep(*, now: dt.datetime | None = None) -> int:
    """Delete connection rows not seen for REALTIME['CONNECTION_SWEEP_AFTER'] seconds."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=float(realtime_settings.CONNECTION_SWEEP_AFTER))
    count, _ = Connection.objects.filter(last_seen__lt=cutoff).delete()
    return count


def resolve_tenant(user: Any) -> str:
    from django.utils.module_loading import import_string

    resolver = realtime_settings.TENANT_RESOLVER
    if resolver is None or user is None or not user.is_authenticated:
        return ""
    if isinstance(resolver, str):
        resolver = import_string(resolver)
    value = resolver(user)
    return "" if value is None else str(value)[:128]
