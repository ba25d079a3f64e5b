"""Realtime for Django: a durable per-stream event log, published after commit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .context import correlation, get_correlation_id
from .policies import (
    BasePermission,
    IsAuthenticated,
    IsStaff,
    ObjectPolicy,
    StreamPolicy,
    TenantPolicy,
    UserPolicy,
    stream_policy,
)
from .registry import ACTIONS, broadcast, emit_instances, register


def permissions_changed(user_ids: Any, *, using: str | None = None) -> None:
    """Make these users' sockets decide their subscriptions again, after the transaction commits.

    Call it when something a stream policy reads changes outside guardian's permission rows and
    Django's groups (which are watched already), such as a tenant membership table. `using` is
    the database whose transaction holds the change (the default one if omitted). Calls in one
    transaction are gathered: each user is told once when it commits.
    """
    from .invalidation import permissions_changed as _changed

    _changed(user_ids, using=using)


if TYPE_CHECKING:
    from .events import Envelope

__all__ = [
    "ACTIONS",
    "BasePermission",
    "IsAuthenticated",
    "IsStaff",
    "ObjectPolicy",
    "StreamPolicy",
    "TenantPolicy",
    "UserPolicy",
    "broadcast",
    "correlation",
    "emit",
    "emit_instances",
    "emit_many",
    "get_correlation_id",
    "permissions_changed",
    "register",
    "stream_policy",
]


def emit(stream: str, type: str, data: Any = None, **kwargs: Any) -> Envelope:
    """Log an event on `stream` in the current transaction and publish it after commit."""
    from .log import emit as _emit

    return _emit(stream, type, data, **kwargs)


def emit_many(events: Any, **kwargs: Any) -> list[Envelope]:
    """Log and publish many `(stream, type, data)` events in a bounded number of queries."""
    from .log import emit_many as _emit_many

    return _emit_many(events, **kwargs)
