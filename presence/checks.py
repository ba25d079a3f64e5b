"""System checks of the presence app."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured


@checks.register()
def check_backend(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.utils.module_loading import import_string

    from .backends import PresenceBackend
    from .conf import presence_settings

    try:
        presence_settings.BACKEND  # noqa: B018  (loads the dict: unknown keys raise)
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="presence.E007")]
    if not isinstance(presence_settings.BACKEND, str):
        return [
            checks.Error(
                f"PRESENCE['BACKEND'] must be a dotted path, not {presence_settings.BACKEND!r}",
                id="presence.E001",
            )
        ]
    try:
        backend = import_string(presence_settings.BACKEND)
    except ImportError as exc:
        return [
            checks.Error(
                f"PRESENCE['BACKEND'] {presence_settings.BACKEND!r} cannot be imported: {exc}",
                id="presence.E001",
            )
        ]
    if not (isinstance(backend, type) and issubclass(backend, PresenceBackend)):
        return [checks.Error("PRESENCE['BACKEND'] is not a PresenceBackend", id="presence.E002")]
    messages: list[checks.CheckMessage] = []
    if backend.__name__ == "MemoryBackend" and not settings.DEBUG:
        messages.append(
            checks.Warning(
                "The in-memory presence backend is not shared between processes: with more "
                "than one server process each shows its own members.",
                hint="Set PRESENCE = {'BACKEND': 'presence.backends.redis.RedisBackend', ...}.",
                id="presence.W001",
            )
        )
    config = presence_settings.CONFIG
    if config is not None and not isinstance(config, dict):
        messages.append(
            checks.Error(
                f"PRESENCE['CONFIG'] must be a dict of the backend's keyword arguments, not "
                f"{config!r}",
                id="presence.E005",
            )
        )
    problem = _user_serializer_problem(presence_settings.USER_SERIALIZER)
    if problem:
        messages.append(checks.Error(problem, id="presence.E006"))
    bad = _bad_numbers(presence_settings)
    if bad:
        messages.append(
            checks.Error(
                "PRESENCE " + "; ".join(bad) + ": the background refresh and sweep would spin "
                "(or never run), and typing indicators and member lists would misbehave.",
                id="presence.E004",
            )
        )
        return messages
    ttl = float(presence_settings.TTL)
    refresh = presence_settings.REFRESH_INTERVAL
    if refresh is not None and float(refresh) >= ttl:
        messages.append(
            checks.Error(
                "PRESENCE['REFRESH_INTERVAL'] must be shorter than PRESENCE['TTL'], or live "
                "users expire between refreshes.",
                id="presence.E003",
            )
        )
    return messages


# (setting, may it be zero, may it be None)
_NUMBERS = (
    ("TTL", False, False),
    ("REFRESH_INTERVAL", False, True),
    ("SWEEP_INTERVAL", False, False),
    ("TYPING_INTERVAL", True, False),
    ("TYPING_EXPIRES_MS", True, False),
    ("MAX_LISTED", True, False),
    ("BACKEND_TIMEOUT", False, False),
)


def _user_serializer_problem(configured: Any) -> str | None:
    from django.utils.module_loading import import_string

    if isinstance(configured, str):
        try:
            configured = import_string(configured)
        except ImportError as exc:
            return f"PRESENCE['USER_SERIALIZER'] cannot be imported: {exc}"
    if not callable(configured):  # a DRF serializer class is callable too
        return f"PRESENCE['USER_SERIALIZER'] is neither a callable nor a class: {configured!r}"
    return None


def _bad_numbers(presence_settings: Any) -> list[str]:
    bad = []
    for name, zero_ok, none_ok in _NUMBERS:
        value = getattr(presence_settings, name)
        if value is None and none_ok:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            bad.append(f"[{name!r}] = {value!r} is not a number")
            continue
        except OverflowError:  # an int past any float
            bad.append(f"[{name!r}] = {value!r} is too large")
            continue
        low = number < 0 or (number == 0 and not zero_ok)
        if isinstance(value, bool) or not math.isfinite(number) or low:
            least = "at least 0" if zero_ok else "greater than 0"
            bad.append(f"[{name!r}] = {value!r} must be a finite number {least}")
    return bad
