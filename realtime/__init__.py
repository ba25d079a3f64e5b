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
    "get_correlation_id",
    "register",
    "stream_policy",
]


def emit(stream: str, type: str, data: Any = None, **kwargs: Any) -> Envelope:
    """Log an event on `stream` in the current transaction and publish it after commit."""
    from .log import emit as _emit

    return _emit(stream, type, data, **kwargs)
