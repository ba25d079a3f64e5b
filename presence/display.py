"""How a present user is shown to the others."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from django.core.exceptions import ValidationError
from django.utils.module_loading import import_string

from .conf import presence_settings

logger = logging.getLogger("presence")


def user_display(user: Any) -> dict[str, Any]:
    """The default: id, username and full name (no e-mail: members see each other)."""
    full_name = user.get_full_name() if hasattr(user, "get_full_name") else ""
    username = user.get_username()
    return {"id": user.pk, "username": username, "name": full_name or username}


def serializer() -> Any:
    """The configured USER_SERIALIZER as a callable (user) -> dict of display fields.

    What it returns always has the user's `id` as a `left` names it (clients match the two)
    and encodes as JSON. A serializer that raises, returns something else than a dict or a
    value JSON cannot carry shows that user by `id` alone, logged: a mistake in it never
    costs a join, a subscribe reply or the member list.
    """
    configured = presence_settings.USER_SERIALIZER
    if isinstance(configured, str):
        configured = import_string(configured)
    if isinstance(configured, type):  # a DRF serializer class
        cls = configured

        def configured(user: Any) -> Any:
            return dict(cls(user).data)

    return functools.partial(_shown, configured)


def user_id(user_pk: Any) -> Any:
    """A user's id as presence frames carry it: a number for an integer pk, else text."""
    text = str(user_pk)
    return int(text) if text.isdigit() else text


def _shown(show: Any, user: Any) -> dict[str, Any]:
    try:
        fields = show(user)
        if not isinstance(fields, dict):
            raise TypeError(f"returned {type(fields).__name__}, not a dict")
        fields = {**fields, "id": user_id(user.pk)}
        json.dumps(fields, allow_nan=False)
    except Exception as exc:
        # Logged once per kind of failure (with its traceback), not once per user listed.
        kind = (repr(presence_settings.USER_SERIALIZER), type(exc).__name__, str(exc)[:200])
        if kind not in _reported and len(_reported) < 100:
            _reported.add(kind)
            logger.exception(
                "presence USER_SERIALIZER %r failed (first seen for user %s); such users are "
                "shown by id only",
                presence_settings.USER_SERIALIZER,
                user.pk,
            )
        return {"id": user_id(user.pk)}
    return fields


_reported: set[tuple[str, str, str]] = set()


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
