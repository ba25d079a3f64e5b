"""System checks: bad registrations and settings are reported at startup, not at the first save."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import math
import re
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
from django.utils.module_loading import import_string

from .conf import realtime_settings
from .registry import Registration, RegistrationError, _label, registry, serializer_problem


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
def check_audiences(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Report stream policies' `audiences` that cannot work, and registration audiences no
    policy of their streams declares (their payload would never be sent)."""
    from .policies import ObjectPolicy, is_valid_audience, stream_kinds

    messages: list[checks.CheckMessage] = []
    declared: dict[str, set[str]] = {}
    try:
        kinds = sorted(stream_kinds.kinds())
    except ImproperlyConfigured:  # REALTIME itself cannot be read: that is E010's
        return []
    for kind in kinds:
        try:
            policy = stream_kinds.get(kind)
        except Exception:  # an unimportable STREAM_POLICIES entry is E013's
            continue
        audiences = getattr(policy, "audiences", None)
        if audiences is None or policy is None:
            continue
        name = type(policy).__name__
        if not isinstance(audiences, dict):
            messages.append(
                checks.Error(
                    f"{name}.audiences (stream kind {kind!r}) must be a dict of audience name to "
                    f"test, not {type(audiences).__name__}",
                    id="realtime.E022",
                )
            )
            continue
        declared[kind] = set(audiences)
        for audience, test in audiences.items():
            problem = None
            if not is_valid_audience(audience):
                problem = (
                    f"{audience!r} is not an audience name: use 1-32 lowercase letters, digits "
                    "or '_', starting with a letter"
                )
            elif isinstance(policy, ObjectPolicy) and isinstance(test, str):
                if "." not in test:
                    problem = f"{audience!r}: a permission is 'app_label.codename', not {test!r}"
            elif isinstance(test, str):
                try:
                    test = import_string(test)
                except ImportError as exc:
                    problem = f"{audience!r}: {test!r} cannot be imported ({exc})"
            if problem is None and not isinstance(test, str) and not callable(test):
                problem = f"{audience!r}: a test is a callable (user, key) -> bool, not {test!r}"
            if problem:
                messages.append(
                    checks.Error(
                        f"{name}.audiences (stream kind {kind!r}): {problem}", id="realtime.E022"
                    )
                )
    for reg in registry.all():
        if app_configs is not None and reg.model._meta.app_config not in app_configs:
            continue
        if not isinstance(reg.audiences, dict) or not reg.audiences:
            continue
        if not all(isinstance(spec, str) for spec in reg.streams):
            continue  # a callable's streams are known only per instance
        reg_kinds = {spec.partition(":")[0] for spec in reg.streams}  # type: ignore[union-attr]
        reachable = set().union(*(declared.get(kind, set()) for kind in reg_kinds))
        for audience in reg.audiences:
            if audience not in reachable:
                messages.append(
                    checks.Warning(
                        f"{_label(reg.model)} ({reg.version}): audiences[{audience!r}] is "
                        "declared by no policy of its streams' kinds "
                        f"({', '.join(sorted(reg_kinds))}): no reader gets that payload",
                        hint="Add the audience to the stream policy's `audiences`.",
                        obj=reg.model,
                        id="realtime.W023",
                    )
                )
    return messages


@checks.register("realtime")
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Report REALTIME settings that cannot work, and a missing channel layer."""
    try:
        alias = realtime_settings.CHANNEL_LAYER
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="realtime.E010")]
    prefix = realtime_settings.GROUP_PREFIX
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", prefix):
        return [
            checks.Error(
                f"REALTIME['GROUP_PREFIX'] is {prefix!r}: use 1-20 letters, digits, '-' or '_'",
                id="realtime.E012",
            )
        ]
    from .policies import StreamPolicy
    from .streams import KIND_PATTERN

    errors: list[checks.CheckMessage] = []
    policies = realtime_settings.STREAM_POLICIES or {}
    if not isinstance(policies, dict):
        errors.append(
            checks.Error(
                f"REALTIME['STREAM_POLICIES'] must be a dict of stream kind to policy, not "
                f"{type(policies).__name__}",
                id="realtime.E013",
            )
        )
        policies = {}
    for kind, path in policies.items():
        if not (isinstance(kind, str) and re.fullmatch(KIND_PATTERN, kind)):
            # parse_stream() refuses such a kind, so no subscribe could ever reach it.
            errors.append(
                checks.Error(
                    f"STREAM_POLICIES key {kind!r} is not a valid stream kind: it must match "
                    f"{KIND_PATTERN}",
                    id="realtime.E013",
                )
            )
            continue
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
    bad_numbers = _bad_numbers()
    for problem in bad_numbers:
        errors.append(checks.Error(problem, id="realtime.E017"))
    header = realtime_settings.CORRELATION_HEADER
    if not (isinstance(header, str) and _HEADER_NAME.fullmatch(header)):
        errors.append(
            checks.Error(
                f"REALTIME['CORRELATION_HEADER'] is {header!r}: use an HTTP header name, such "
                "as 'X-Request-ID'",
                hint="CorrelationIdMiddleware reads and sets this header on every request.",
                id="realtime.E018",
            )
        )
    resolver_problem = _tenant_resolver_problem(realtime_settings.TENANT_RESOLVER)
    if resolver_problem:
        errors.append(checks.Error(resolver_problem, id="realtime.E019"))
    errors += [checks.Error(problem, id="realtime.E021") for problem in _bad_names()]
    shared = realtime_settings.PUBLISH_USER_REDIS
    if shared is not None and not (
        isinstance(shared, dict)
        and set(shared) <= {"url", "prefix"}
        and isinstance(shared.get("url"), str)
        and shared["url"].startswith(("redis://", "rediss://", "unix://"))
        and isinstance(shared.get("prefix", ""), str)
    ):
        errors.append(
            checks.Error(
                f"REALTIME['PUBLISH_USER_REDIS'] is {shared!r}: use None, or "
                "{'url': 'redis://…', 'prefix': '…'} (prefix optional)",
                id="realtime.E027",
            )
        )
    auth_problems = _authentication_problems(realtime_settings.HTTP_AUTHENTICATION_CLASSES)
    errors += [checks.Error(problem, id="realtime.E025") for problem in auth_problems]
    if not auth_problems:
        errors += _password_classes()
    if bad_numbers:
        return errors  # the comparisons below need numbers
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


# An RFC 9110 token: what a header name may be.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# (setting, integers only, must it be greater than 0 (else at least 0), may it be None). The
# code reads each with int() or float() or compares it with numbers, so a string or None
# breaks it at run time, and a zero heartbeat or batch spins a loop.
_NUMBERS: tuple[tuple[str, bool, bool, bool], ...] = (
    ("PUBLISH_QUEUE_SIZE", True, False, False),
    ("PUBLISH_TIMEOUT", False, True, False),
    ("GROUP_TIMEOUT", False, True, False),
    ("PUBLISH_BATCH", True, True, False),
    ("RELAY_INTERVAL", False, True, False),
    ("RELAY_GRACE", False, False, False),
    ("RELAY_BATCH", True, True, False),
    ("RETENTION_MAX_AGE", False, False, True),
    ("RETENTION_MAX_EVENTS", True, False, True),
    ("PRUNE_BATCH", True, True, False),
    ("HEARTBEAT", False, True, False),
    ("LAYER_PROBE_INTERVAL", False, False, True),  # 0 or None: off
    ("TAIL_CHECK_INTERVAL", False, False, True),  # 0 or None: off
    ("MAX_FRAME_BYTES", True, True, False),
    ("MAX_DEPTH", True, True, False),
    ("MALFORMED_LIMIT", True, False, False),
    ("MAX_SUBSCRIPTIONS", True, True, False),
    ("MAX_CONNECTIONS_PER_USER", True, True, False),
    ("PUBLISH_RATE", False, False, False),
    ("PUBLISH_BURST", True, False, False),
    ("SUBSCRIBE_RATE", False, False, False),
    ("SUBSCRIBE_BURST", True, True, False),
    ("ABUSE_LIMIT", True, False, False),
    ("AUTHZ_RECHECK_INTERVAL", False, False, True),  # 0 or None: off
    ("MAX_UNACKED_BYTES", True, True, False),
    ("REPLAY_BATCH", True, True, False),
    ("REPLAY_BUFFER", True, True, False),
    ("TICKET_TTL", False, True, False),
    ("CONNECTION_SWEEP_AFTER", False, True, False),
    ("IDEMPOTENCY_TTL", False, False, False),
)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except (TypeError, OverflowError):  # not a number; an int past any float (10**400)
        return False


def _bad_numbers() -> list[str]:
    problems = []
    for name, integer, positive, none_ok in _NUMBERS:
        value = getattr(realtime_settings, name)
        if value is None and none_ok:
            continue
        allowed = int if integer else int | float
        if (
            isinstance(value, bool)
            or not isinstance(value, allowed)
            or not _finite(value)
            or value < 0
            or (positive and value == 0)
        ):
            kind = "an integer" if integer else "a number"
            bound = "greater than 0" if positive else "of 0 or more"
            problems.append(
                f"REALTIME[{name!r}] is {value!r}: use {kind} {bound}"
                + (", or None" if none_ok else "")
            )
    return problems


def _bad_names() -> list[str]:
    """Text settings the code uses as they are: an event version, a column, a URL path."""
    from .events import is_valid_version

    problems = []
    version = realtime_settings.DEFAULT_VERSION
    if not (isinstance(version, str) and is_valid_version(version)):
        # Anything else never matches a registration's version: every event's primary frame
        # would silently be its first registration's.
        problems.append(f"REALTIME['DEFAULT_VERSION'] is {version!r}: use a version like 'v1'")
    node = realtime_settings.NODE_ID
    if node is not None and not (isinstance(node, str) and 0 < len(node) <= 128):
        problems.append(
            f"REALTIME['NODE_ID'] is {node!r}: use None or a name of 1 to 128 characters (the "
            "Connection rows' node column)"
        )
    path = realtime_settings.METRICS_PATH
    if not (isinstance(path, str) and path.strip("/")):
        problems.append(
            f"REALTIME['METRICS_PATH'] is {path!r}: use a URL path such as 'realtime/metrics'"
        )
    return problems


def _tenant_resolver_problem(resolver: Any) -> str | None:
    if resolver is None:
        return None
    if isinstance(resolver, str):
        try:
            resolver = import_string(resolver)
        except ImportError as exc:
            return f"REALTIME['TENANT_RESOLVER'] cannot be imported: {exc}"
    if not callable(resolver):
        return f"REALTIME['TENANT_RESOLVER'] is not callable: {resolver!r}"
    return None


def _authentication_problems(classes: Any) -> list[str]:
    """What is wrong with `HTTP_AUTHENTICATION_CLASSES`: `None`, or a list of DRF
    authentication classes or dotted paths to them."""
    if classes is None:
        return []
    name = "REALTIME['HTTP_AUTHENTICATION_CLASSES']"
    if isinstance(classes, str) or not isinstance(classes, list | tuple):
        return [f"{name} is {classes!r}: use None or a list of DRF authentication classes"]
    from rest_framework.authentication import BaseAuthentication

    problems = []
    for entry in classes:
        found = entry
        if isinstance(entry, str):
            try:
                found = import_string(entry)
            except ImportError as exc:
                problems.append(f"{name}: {entry!r} cannot be imported: {exc}")
                continue
        if not (isinstance(found, type) and issubclass(found, BaseAuthentication)):
            problems.append(f"{name}: {entry!r} is not a DRF authentication class")
    return problems


def _password_classes() -> list[checks.CheckMessage]:
    """W026: a password class among the HTTP read paths' classes (DRF's default list has
    `BasicAuthentication`): every re-decision of a stream or held poll hashes it again."""
    from rest_framework.authentication import BasicAuthentication

    from .httpauth import authentication_classes

    try:
        classes = authentication_classes()
    except Exception:  # DRF's own list does not import: DRF's views fail on it, not ours to say
        return []
    found = [
        c.__name__ for c in classes if isinstance(c, type) and issubclass(c, BasicAuthentication)
    ]
    if not found:
        return []
    return [
        checks.Warning(
            f"{', '.join(found)} authenticates the event feed, SSE and the presence list "
            "(REALTIME['HTTP_AUTHENTICATION_CLASSES'], or DRF's DEFAULT_AUTHENTICATION_CLASSES "
            "when it is None): each re-decision of a stream or a held poll checks the password "
            "again, a deliberately slow hash",
            hint="List the classes those paths should take, e.g. "
            "['rest_framework.authentication.SessionAuthentication', "
            "'rest_framework.authentication.TokenAuthentication'].",
            id="realtime.W026",
        )
    ]


_RATE = re.compile(r"[0-9]+/[smhd][a-z]*")


@checks.register("realtime")
def check_write_rate(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The `realtime_writes` throttle rate, which DRF parses on every request, reads included."""
    from rest_framework.settings import api_settings

    rates = api_settings.DEFAULT_THROTTLE_RATES or {}
    rate = rates.get("realtime_writes") if isinstance(rates, dict) else None
    if rate is None or (isinstance(rate, str) and _RATE.fullmatch(rate)):
        return []
    return [
        checks.Error(
            f'REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["realtime_writes"] is {rate!r}',
            hint='a number of requests per period, such as "300/min" (s, min, hour, day), '
            "or None for no limit; DRF would fail every request with it",
            id="realtime.E024",
        )
    ]


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
    try:
        alias = realtime_settings.CHANNEL_LAYER
    except ImproperlyConfigured:
        return ""  # an unknown key: check_settings reports it (realtime.E010)
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
