"""System checks of the notifications app."""

from __future__ import annotations

from typing import Any

from django.core import checks


@checks.register(checks.Tags.security)
def check_user_stream(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from realtime.policies import UserPolicy, stream_kinds

    policy = stream_kinds.get("user")
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
