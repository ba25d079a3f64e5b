"""System checks of the notifications app."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured


@checks.register(checks.Tags.security)
def check_user_stream(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from realtime.policies import UserPolicy, stream_kinds

    try:
        policy = stream_kinds.get("user")
    except (ImproperlyConfigured, ImportError, AttributeError):
        # REALTIME or its STREAM_POLICIES is malformed: realtime.E010 or E013 reports it.
        return []
    if policy is None:
        return [
            checks.Error(
                "No stream policy for the `user` kind: notifications cannot be delivered.",
                hint="Register realtime.UserPolicy for 'user' (stream_policy('user')(UserPolicy)).",
                id="notifications.E001",
            )
        ]
    if not isinstance(policy, UserPolicy):
        return [
            checks.Warning(
                f"The `user` stream kind uses {type(policy).__name__}, not UserPolicy: make sure "
                "only the user reads their own notifications.",
                id="notifications.W001",
            )
        ]
    return []
