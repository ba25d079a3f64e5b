"""How a present user is shown to the others."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.utils.module_loading import import_string

from .conf import presence_settings


def user_display(user: Any) -> dict[str, Any]:
    """The default: id, username and full name (no e-mail: members see each other)."""
    full_name = user.get_full_name() if hasattr(user, "get_full_name") else ""
    username = user.get_username()
    return {"id": user.pk, "username": username, "name": full_name or username}


def serializer() -> Any:
    """The configured USER_SERIALIZER as a callable (user) -> dict."""
    configured = presence_settings.USER_SERIALIZER
    if isinstance(configured, str):
        configured = import_string(configured)
    if isinstance(configured, type):  # a DRF serializer class
        cls = configured
        return lambda user: dict(cls(user).data)
    return configured


def display_many(user_ids: list[str]) -> dict[str, dict[str, Any]]:
    """{user id: display fields} in one query (runs in a worker thread)."""
    from django.contrib.auth import get_user_model

    show = serializer()
    model = get_user_model()
    pks = []
    for user_id in user_ids:
        try:
            pks.append(model._meta.pk.to_python(user_id))
        except (ValidationError, ValueError, TypeError):  # a malformed id is not shown
            continue
    return {str(pk): show(user) for pk, user in model._default_manager.in_bulk(pks).items()}
