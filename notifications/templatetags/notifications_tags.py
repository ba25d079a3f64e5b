"""`{% load notifications_tags %}` then `{% unread_notifications_count %}`."""

from __future__ import annotations

from typing import Any

from django import template

from realtime.conditional import stream_positions

from ..service import stream_of, unread_count

register = template.Library()


@register.simple_tag(takes_context=True)
def unread_notifications_count(context: Any) -> int:
    """The requesting user's unread notifications (0 when anonymous)."""
    request = context.get("request")
    user = getattr(request, "user", None) or context.get("user")
    return unread_count(user)


@register.simple_tag(takes_context=True)
def notifications_stream(context: Any) -> str:
    """The private stream of the requesting user (`user:<id>`), for the client to subscribe."""
    request = context.get("request")
    user = getattr(request, "user", None) or context.get("user")
    if user is None or not user.is_authenticated:
        return ""
    return stream_of(user)


@register.inclusion_tag("notifications/bell.html", takes_context=True)
def notification_bell(context: Any) -> dict[str, Any]:
    """A bell with the unread count, kept live by the page's realtime client (user stream)."""
    request = context.get("request")
    user = getattr(request, "user", None) or context.get("user")
    authenticated = bool(user is not None and user.is_authenticated)
    if not authenticated:
        return {"authenticated": False, "count": 0, "stream": "", "since": "", "epoch": ""}
    stream = stream_of(user)
    # The position first, then the count: the page subscribes from there, so a notification
    # committed in between is replayed, never missed.
    since, epoch = stream_positions([stream])[stream]
    return {
        "authenticated": True,
        "count": unread_count(user),
        "stream": stream,
        "since": since,
        "epoch": epoch or "",
    }
