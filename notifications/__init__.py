"""Private per-user notifications: durable, live on `user:<id>`, readable over REST."""

from __future__ import annotations

from typing import Any


def notify(*args: Any, **kwargs: Any) -> Any:
    """Notify users (see `notifications.service.notify`)."""
    from .service import notify as _notify

    return _notify(*args, **kwargs)


__all__ = ["notify"]
