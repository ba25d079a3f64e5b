"""Single-use, signed, short-lived WebSocket tickets for clients that cannot send cookies."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
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

    payload = {
        "u": str(user.pk),
        "n": secrets.token_hex(12),
        "h": auth_hash(user),
        "t": time.time(),  # issued at: a logout refuses the tickets issued before it
    }
    return signing.dumps(payload, salt=_SALT)


def _logout_mark(user_pk: Any) -> str:
    # A UsedTicket row of its own kind: "this user logged out at expires_at - TICKET_TTL".
    # Nonces are 24 hex digits; this key cannot be one (the prefix), and fits the column.
    return "out:" + hashlib.sha256(str(user_pk).encode()).hexdigest()[:28]


def revoke_issued(user: Any) -> None:
    """Refuse every ticket of `user` issued until now (called on logout).

    Kept as a `UsedTicket` row that expires when the last ticket it refuses would have, so
    `realtime_prune` forgets it with them.
    """
    ttl = float(realtime_settings.TICKET_TTL)
    UsedTicket.objects.update_or_create(
        nonce=_logout_mark(user.pk),
        defaults={"expires_at": timezone.now() + dt.timedelta(seconds=ttl)},
    )


def _last_logout(user_pk: Any) -> float | None:
    """When the user last logged out (a Unix time), while the mark is kept; else None."""
    mark = (
        UsedTicket.objects.filter(nonce=_logout_mark(user_pk))
        .values_list("expires_at", flat=True)
        .first()
    )
    if mark is None:
        return None
    return (mark - dt.timedelta(seconds=float(realtime_settings.TICKET_TTL))).timestamp()


def logged_out_since(user_pk: Any, since: float) -> bool:
    """Whether the user logged out after `since` (a Unix time), as far as the mark still says."""
    if user_pk is None:
        return False
    logged_out = _last_logout(user_pk)
    return logged_out is not None and logged_out > since


def redeem(ticket: str) -> Any | None:
    """Return the ticket's user if it is authentic, fresh, unused and the user active; else None.

    A ticket is consumed even if the user turns out to be inactive.
    """
    from django.contrib.auth import get_user_model

    from .policies import same_password

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
    logged_out = _last_logout(payload["u"])
    issued = payload.get("t")
    if logged_out is not None and (not isinstance(issued, int | float) or issued <= logged_out):
        return None  # issued before the user's last logout
    User = get_user_model()
    try:
        user = User._default_manager.get(pk=payload["u"])
    except (User.DoesNotExist, ValueError):
        return None
    if not same_password(user, str(payload.get("h") or "")):
        return None  # the password changed since the ticket was issued
    return user if user.is_active else None


def prune_used() -> int:
    """Forget used tickets that have expired anyway."""
    count, _ = UsedTicket.objects.filter(expires_at__lt=timezone.now()).delete()
    return count
