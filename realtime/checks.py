"""System checks: bad registrations and settings are reported at startup, not at the first save."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import uuid
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper

from .conf import realtime_settings
from .registry import Registration, RegistrationError, registry, serializer_problem


class _NeedsDatabase(Exception):
    pass


@contextlib.contextmanager
def _no_queries() -> Iterator[None]:
    """Make any database access in the block raise `_NeedsDatabase` (checks run before the
    database may be there, so a probe must not depend on it)."""

    def refuse(self: Any) -> None:
        raise _NeedsDatabase

    with mock.patch.object(BaseDatabaseWrapper, "ensure_connection", refuse):
        yield


def _probe_value(field: models.Field) -> Any:  # type: ignore[type-arg]
    if field.is_relation:
        return 1
    if isinstance(field, models.BooleanField):
        return True
    if isinstance(field, models.UUIDField):
        return uuid.UUID(int=1)
    if isinstance(field, (models.IntegerField, models.AutoField)):
        return 1
    if isinstance(field, models.DecimalField):
        return decimal.Decimal(1)
    if isinstance(field, models.FloatField):
        return 1.0
    if isinstance(field, models.DateTimeField):
        return dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    if isinstance(field, models.DateField):
        return dt.date(2026, 1, 1)
    if isinstance(field, models.JSONField):
        return {}
    return "probe"


def _probe_instance(model: Any) -> Any:
    """An unsaved instance with plausible values in every concrete field."""
    instance = model()
    for field in model._meta.concrete_fields:
        with contextlib.suppress(Exception):
            setattr(instance, field.attname, _probe_value(field))
    return instance


def _probe_streams(reg: Registration) -> str | None:
    """Call the stream callables on a probe instance; return a problem, if one shows."""
    try:
        with _no_queries():
            instance = _probe_instance(reg.model)
            reg.stream_names(instance)
    except RegistrationError as exc:
        return str(exc)
    except _NeedsDatabase:
        return None  # it reads related rows; only a real save can tell
    except Exception as exc:
        if isinstance(exc.__cause__, _NeedsDatabase) or isinstance(exc.__context__, _NeedsDatabase):
            return None
        return (
            f"{reg.model._meta.label} ({reg.version}) streams raised "
            f"{type(exc).__name__}: {exc} for an instance with every field set"
        )
    return None


@checks.register("realtime")
def check_registrations(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Report registrations that cannot work."""
    errors: list[checks.CheckMessage] = []
    for problem in registry.problems:
        errors.append(checks.Error(problem, id="realtime.E001"))
    for reg in registry.all():
        if app_configs is not None and reg.model._meta.app_config not in app_configs:
            continue
        problems = [*reg.problems, *filter(None, [serializer_problem(reg)])]
        for problem in problems:
            errors.append(checks.Error(problem, obj=reg.model, id="realtime.E002"))
        if not problems:
            probed = _probe_streams(reg)
            if probed:
                errors.append(
                    checks.Error(
                        probed,
                        hint="A stream name is '<kind>:<key>', such as 'project:42'.",
                        obj=reg.model,
                        id="realtime.E003",
                    )
                )
    return errors


@checks.register("realtime")
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Report unknown REALTIME keys and a missing channel layer."""
    try:
        alias = realtime_settings.CHANNEL_LAYER
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="realtime.E010")]
    import re

    prefix = realtime_settings.GROUP_PREFIX
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", prefix):
        return [
            checks.Error(
                f"REALTIME['GROUP_PREFIX'] is {prefix!r}: use 1-20 letters, digits, '-' or '_'",
                id="realtime.E012",
            )
        ]
    errors: list[checks.CheckMessage] = []
    for kind, path in (realtime_settings.STREAM_POLICIES or {}).items():
        from django.utils.module_loading import import_string

        from .policies import StreamPolicy

        try:
            policy = import_string(path) if isinstance(path, str) else path
        except ImportError as exc:
            errors.append(checks.Error(f"STREAM_POLICIES[{kind!r}]: {exc}", id="realtime.E013"))
            continue
        if not (
            isinstance(policy, StreamPolicy)
            or (isinstance(policy, type) and issubclass(policy, StreamPolicy))
        ):
            errors.append(
                checks.Error(
                    f"STREAM_POLICIES[{kind!r}] is not a StreamPolicy: {policy!r}",
                    id="realtime.E013",
                )
            )
    thresholds = realtime_settings.GC_THRESHOLDS
    if thresholds is not None and not (
        isinstance(thresholds, tuple | list)
        and 1 <= len(thresholds) <= 3
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in thresholds)
    ):
        errors.append(
            checks.Error(
                f"REALTIME['GC_THRESHOLDS'] is {thresholds!r}: use None or 1 to 3 integers of "
                "zero or more, as gc.set_threshold() takes",
                id="realtime.E015",
            )
        )
    if float(realtime_settings.CONNECTION_SWEEP_AFTER) <= 2 * float(realtime_settings.HEARTBEAT):
        errors.append(
            checks.Error(
                "REALTIME['CONNECTION_SWEEP_AFTER'] must be more than twice HEARTBEAT, or live "
                "connections are swept between two heartbeats",
                id="realtime.E014",
            )
        )
    if int(realtime_settings.SUBSCRIBE_BURST) < int(realtime_settings.MAX_SUBSCRIPTIONS):
        errors.append(
            checks.Warning(
                "REALTIME['SUBSCRIBE_BURST'] is below MAX_SUBSCRIPTIONS: a client that comes "
                "back with all its subscriptions is refused some with rate_limited and has to "
                "retry them",
                id="realtime.W016",
            )
        )
    if any(message.is_serious() for message in errors):
        return errors
    layers = getattr(settings, "CHANNEL_LAYERS", {}) or {}
    if alias not in layers:
        return [
            checks.Error(
                f"REALTIME['CHANNEL_LAYER'] is {alias!r} but CHANNEL_LAYERS has no such entry",
                hint="Add a channel layer, e.g. channels_redis.pubsub.RedisPubSubChannelLayer.",
                id="realtime.E011",
            )
        ]
    return errors


@checks.register("realtime", checks.Tags.security, deploy=False)
def check_allowed_hosts(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """WebSocket origins are checked against ALLOWED_HOSTS; '*' would accept any site."""
    if "*" in settings.ALLOWED_HOSTS and not settings.DEBUG:
        return [
            checks.Error(
                "ALLOWED_HOSTS contains '*' while WebSockets are served outside DEBUG: any web "
                "site could open sockets with your users' cookies.",
                hint="List the hosts that serve your pages in ALLOWED_HOSTS.",
                id="realtime.E020",
            )
        ]
    return []


def _layer_backend() -> str:
    alias = realtime_settings.CHANNEL_LAYER
    layer = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(alias) or {}
    return str(layer.get("BACKEND", ""))


@checks.register("realtime")
def check_channel_layer_in_production(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """The in-memory layer reaches only its own process: fine for `make run`, not beyond."""
    import os

    if not _layer_backend().endswith("InMemoryChannelLayer"):
        return []
    messages: list[checks.CheckMessage] = []
    workers = os.environ.get("WEB_CONCURRENCY", "")
    if workers.isdigit() and int(workers) > 1:
        messages.append(
            checks.Error(
                f"The in-memory channel layer with WEB_CONCURRENCY={workers}: events published "
                "in one worker never reach sockets held by the others.",
                hint="Use channels_redis.pubsub.RedisPubSubChannelLayer (set REDIS_URL).",
                id="realtime.E031",
            )
        )
    if not settings.DEBUG:
        messages.append(
            checks.Error(
                "The in-memory channel layer is used outside DEBUG: with more than one process "
                "(or a separate relay) events are lost between them.",
                hint="Use channels_redis.pubsub.RedisPubSubChannelLayer; the demo settings do "
                "when REDIS_URL is set.",
                id="realtime.E030",
            )
        )
    return messages


@checks.register("realtime", checks.Tags.security, deploy=True)
def check_deployment(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """`manage.py check --deploy`: what exposes sockets and their session cookies.

    Errors, not warnings: TLS is not optional for a socket the session cookie opens, and a
    release step that runs `check --deploy --fail-level ERROR` must stop on them.
    """
    messages: list[checks.CheckMessage] = []
    if settings.DEBUG:
        messages.append(
            checks.Error(
                "DEBUG is on: tracebacks, the in-memory layer and DEBUG-only defaults are not "
                "for production.",
                id="realtime.E040",
            )
        )
        return messages
    if not (settings.SESSION_COOKIE_SECURE and settings.CSRF_COOKIE_SECURE):
        messages.append(
            checks.Error(
                "SESSION_COOKIE_SECURE and CSRF_COOKIE_SECURE should be True: the session "
                "cookie authenticates WebSockets and SSE, and must never travel in clear.",
                id="realtime.E041",
            )
        )
    if not (settings.SECURE_SSL_REDIRECT or getattr(settings, "SECURE_PROXY_SSL_HEADER", None)):
        messages.append(
            checks.Error(
                "Neither SECURE_SSL_REDIRECT nor SECURE_PROXY_SSL_HEADER is set: pages (and so "
                "their ws:// sockets) may be served without TLS.",
                hint="Serve wss:// (daphne with a certificate, or TLS at the proxy with "
                "SECURE_PROXY_SSL_HEADER); see docs/operations.md.",
                id="realtime.E042",
            )
        )
    return messages
