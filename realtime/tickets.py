"""Single-use, signed, short-lived WebSocket tickets for clients that cannot send cookies."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from django.core import signing
from django.db import IntegrityError, transaction
from django.utils import timezone

from .conf import realtime_settings
from .models import UsedTicket

_SALT = "realtime.ticket"


def issue(user: Any) -> str:
    """Return a ticket bound to `user`, valid once within REALTIME['TICKET_TTL'] seconds.

    It carries the user's session auth hash, as a Django session does: a password change
    makes every ticket issued before it worthless.
    """
    from .policies import auth_hash

    payload = {"u": str(user.pk), "n": secrets.token_hex(12), "h": auth_hash(user)}
    return signing.dumps(payload, salt=_SALT)


def redeem(ticket: str) -> Any | None:
    """Return the ticket's user if it is authentic, fresh, unused and the user active; else None.

    A ticket is consumed even if the user turns out to be inactive.
    """
    from django.contrib.auth import get_user_model
    from django.utils.crypto import constant_time_compare

    from .policies import auth_hash

    ttl = float(realtime_settings.TICKET_TTL)
    try:
        payload = signing.loads(ticket, salt=_SALT, max_age=dt.timedelta(seconds=ttl))
    except signing.BadSignature:  # includes SignatureExpired
        return None
    if not isinstance(payload, dict) or not {"u", "n"} <= payload.keys():
        return None
    try:
        with transaction.atomic():
            UsedTicket.objects.create(
                nonce=str(payload["n"])[:32],
                expires_at=timezone.now() + dt.timedelta(seconds=ttl),
            )
    except IntegrityError:
        return None  # already used
    User = get_user_model()
    try:
        user = User._default_manager.get(pk=payload["u"])
    except (User.DoesNotExist, ValueError):
        return None
    now = auth_hash(user)
    if now is not None and not constant_time_compare(str(payload.get("h") or ""), now):
        return None  # the password changed since the ticket was issued
    return user if user.is_active else None


def prune_used() -> int:
    """Forget used tickets that have expired anyway."""
    count, _ = UsedTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return count
