"""Stream authorization: a policy per stream kind, shaped like DRF's permission policies.

A policy says who may subscribe to `<kind>:<key>` (`permission_classes`, then `authorize`),
which client event types may be published on it, and whether it tracks presence. Policies
run in a worker thread, so they may query the database; every call reads permissions anew.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .conf import realtime_settings
from .streams import KIND_PATTERN

logger = logging.getLogger("realtime.policies")
_KIND = re.compile(rf"^{KIND_PATTERN}$")
#: What an audience may be named: it is part of the key of an event's payload variant.
AUDIENCE_PATTERN = r"[a-z][a-z0-9_]{0,31}"
_AUDIENCE = re.compile(rf"^{AUDIENCE_PATTERN}$")


def is_valid_audience(value: object) -> bool:
    """Return whether `value` can name an audience (`owner`, `staff_view`)."""
    return isinstance(value, str) and bool(_AUDIENCE.fullmatch(value))


class BasePermission:
    """A reusable check run before `authorize`, like DRF's permission classes."""

    def has_stream_permission(self, user: Any, kind: str, key: str) -> bool:
        return True


class IsAuthenticated(BasePermission):
    """Only authenticated, active users."""

    def has_stream_permission(self, user: Any, kind: str, key: str) -> bool:
        return bool(user is not None and user.is_authenticated and user.is_active)


class IsStaff(BasePermission):
    """Only active staff users."""

    def has_stream_permission(self, user: Any, kind: str, key: str) -> bool:
        return bool(user is not None and user.is_active and user.is_staff)


class StreamPolicy:
    """Who may subscribe to streams of one kind, and what clients may publish on them."""

    permission_classes: list[type[BasePermission]] = [IsAuthenticated]
    #: Client event types allowed on `publish` (e.g. "v1:typing.started"); none by default.
    client_events: tuple[str, ...] = ()
    #: Largest `data` of a client event, in bytes of JSON: it goes to every subscriber.
    client_event_max_bytes: int = 2048
    #: Whether subscribers are tracked as present (see the presence app).
    presence: bool = False
    #: Events kept for replay, overriding REALTIME['RETENTION_MAX_EVENTS'] for this kind.
    retention: int | None = None
    #: Payload variants by permission, in order of precedence: {audience name: test}. A
    #: subscriber gets the payload registered for the first audience whose test passes (see
    #: `audience`), and the stream's default payload when none does or the event has no
    #: payload for it. A test is a callable (user, key) -> bool or its dotted path; on an
    #: `ObjectPolicy` a string is a permission on the object ("board.delete_project").
    audiences: dict[str, Any] = {}

    def get_permissions(self) -> list[BasePermission]:
        return [permission() for permission in self.permission_classes]

    def check(self, user: Any, kind: str, key: str) -> bool:
        """Return whether `user` may read the stream; a missing object is simply False."""
        for permission in self.get_permissions():
            if not permission.has_stream_permission(user, kind, key):
                return False
        return bool(self.authorize(user, key))

    def authorize(self, user: Any, key: str) -> bool:
        """Decide for one stream key; override this. Deny by default."""
        return False

    def access(self, user: Any, kind: str, key: str) -> str | None:
        """None if `user` may not read the stream, else the audience whose payload they get
        (a name of `audiences`, or "" for the default payload)."""
        if not self.check(user, kind, key):
            return None
        return self.audience(user, key) or ""

    def access_many(self, user: Any, kind: str, keys: Sequence[str]) -> dict[str, str | None]:
        """`access` for several keys of this kind at once ({key: audience or None}), for a
        request that reads many streams (SSE, the event feed). One `access` per key by
        default; `ObjectPolicy` reads all the objects and permissions in a few queries.
        An exception makes the caller decide again key by key, each alone."""
        return {key: self.access(user, kind, key) for key in keys}

    def audience(self, user: Any, key: str) -> str | None:
        """The audience of a reader `check` allowed: the first of `audiences` whose test
        passes, or None for the default payload. Runs in a worker thread, as `authorize`.
        """
        for name, test in self.audiences.items():
            if self.in_audience(user, key, test):
                return name
        return None

    def in_audience(self, user: Any, key: str, test: Any) -> bool:
        """Whether one test of `audiences` passes for `user` on stream key `key`."""
        if isinstance(test, str):
            test = import_string(test)
        return bool(test(user, key))

    def allows_client_event(self, event_type: str) -> bool:
        return event_type in self.client_events

    def clean_client_event(self, user: Any, stream: str, event_type: str, data: Any) -> Any:
        """Validate a client event's `data` and return what is sent on; override this.

        Runs on the event loop for every accepted publish (no database access). Raise
        `ValueError` to refuse the event: the sender gets `event_not_allowed` with its
        message. By default everything passes as sent (within `client_event_max_bytes`):
        receivers must take the sender from `from`, never from `data`.
        """
        return data


class ObjectPolicy(StreamPolicy):
    """`<kind>:<pk>` readable by users holding a django-guardian object permission on the row."""

    model: Any = None
    permission: str = ""
    lookup_field: str = "pk"

    def get_object(self, key: str) -> Any | None:
        try:
            return self.model._default_manager.get(**{self.lookup_field: key})
        except (self.model.DoesNotExist, ValueError, TypeError, ArithmeticError):
            return None
        except Exception as exc:  # e.g. a ValidationError for a malformed UUID key
            if type(exc).__name__ in {"ValidationError", "DataError"}:
                return None
            raise

    #: Within one `access` call, the object and checker `authorize` used, for `audience`
    #: (per thread: policies are shared by the worker threads that decide).
    _decided = threading.local()

    def access(self, user: Any, kind: str, key: str) -> str | None:
        try:
            return super().access(user, kind, key)
        finally:
            self._decided.__dict__.clear()

    def authorize(self, user: Any, key: str) -> bool:
        obj = self.get_object(key)
        if obj is None:
            return False
        checker = _fresh_checker(user)
        self._decided.__dict__.update(key=key, user=user, obj=obj, checker=checker)
        return checker.has_perm(self.permission.split(".", 1)[-1], obj)

    def access_many(self, user: Any, kind: str, keys: Sequence[str]) -> dict[str, str | None]:
        """All the objects in one query and the user's permissions on them in guardian's
        `prefetch_perms` (two more), where one `access` per key makes three each. Only for
        a policy that decides as `ObjectPolicy` does (its `check`, `access`, `authorize`
        and `get_object` not overridden) and looks up a unique field; others, and a single
        key, go key by key. So does every key the query does not place on exactly one row:
        none (missing, malformed, or matched by the database's rules, a case-insensitive
        collation, and not by Python's), or several (a default manager that joins)."""
        field = self._batch_field()
        if field is None or len(keys) < 2:
            return super().access_many(user, kind, keys)
        permissions = self.get_permissions()
        decided: dict[str, str | None] = {}
        wanted: dict[Any, list[str]] = {}
        alone: list[str] = []  # decided by `access`, as one by one would
        for key in keys:
            if not all(p.has_stream_permission(user, kind, key) for p in permissions):
                decided[key] = None
                continue
            try:
                value = field.to_python(key)
            except Exception:  # not a value of the field ("abc" for an integer pk)
                alone.append(key)
                continue
            if value is None or not _storable(self.model, field, value):
                alone.append(key)
            else:
                wanted.setdefault(value, []).append(key)
        rows: dict[Any, list[Any]] = {}
        if wanted:
            lookup = "pk" if self.lookup_field == "pk" else field.name
            for obj in self.model._default_manager.filter(**{f"{lookup}__in": list(wanted)}):
                rows.setdefault(getattr(obj, field.attname), []).append(obj)
        found: dict[str, Any] = {}
        for value, named in wanted.items():
            placed = rows.get(value, [])
            if len(placed) == 1:  # as `get()` needs: two rows, even of one object, raise
                found.update(dict.fromkeys(named, placed[0]))
            else:
                alone += named
        checker: Any = None
        if found:  # else no checker (for an anonymous user guardian would read its own)
            checker = _fresh_checker(user)
            checker.prefetch_perms(list({id(o): o for o in found.values()}.values()))
        codename = self.permission.split(".", 1)[-1]
        for key in alone:
            decided[key] = self.access(user, kind, key)
        for key, obj in found.items():
            if not checker.has_perm(codename, obj):
                decided[key] = None
                continue
            self._decided.__dict__.update(key=key, user=user, obj=obj, checker=checker)
            try:
                decided[key] = self.audience(user, key) or ""
            finally:
                self._decided.__dict__.clear()
        return {key: decided[key] for key in keys}

    def _batch_field(self) -> Any | None:
        """The model field `lookup_field` names, if `access_many` may batch for this policy."""
        cls = type(self)
        if not (
            cls.check is StreamPolicy.check
            and cls.access is ObjectPolicy.access
            and cls.authorize is ObjectPolicy.authorize
            and cls.get_object is ObjectPolicy.get_object
            and self.model is not None
        ):
            return None
        meta = self.model._meta
        if self.lookup_field == "pk":
            return meta.pk
        try:
            field = meta.get_field(self.lookup_field)
        except Exception:  # a lookup across relations, or no such field: as `get_object` does
            return None
        unique = getattr(field, "unique", False) and getattr(field, "concrete", False)
        return field if unique else None

    def audience(self, user: Any, key: str) -> str | None:
        # The object and the checker of the authorization just made, when there was one (the
        # checker has read the user's permissions on the object already): no query more.
        # A string test is a permission on the object; other tests go to `in_audience`.
        if not self.audiences:
            return None
        decided = self._decided.__dict__
        if decided.get("key") == key and decided.get("user") is user:
            obj, checker = decided["obj"], decided["checker"]
        else:
            obj = self.get_object(key)
            if obj is None:
                return None
            checker = _fresh_checker(user)
        for name, test in self.audiences.items():
            if isinstance(test, str):
                if checker.has_perm(test.split(".", 1)[-1], obj):
                    return name
            elif self.in_audience(user, key, test):
                return name
        return None


def _storable(model: Any, field: Any, value: Any) -> bool:
    """Whether `value` can name a row by `field` (an integer beyond its column names none,
    and would not bind: SQLite raises OverflowError)."""
    if not isinstance(value, int):
        return True
    from django.db import connections, router

    return fits_integer_column(connections[router.db_for_read(model)], field, value)


def fits_integer_column(connection: Any, field: Any, value: int) -> bool:
    """Whether `value` fits the integer column of `field` (a relation: of its target)."""
    while getattr(field, "is_relation", False) and getattr(field, "target_field", None):
        field = field.target_field  # a multi-table child's or a OneToOne primary key
    try:
        low, high = connection.ops.integer_field_range(field.get_internal_type())
    except KeyError:  # not an integer column the backend knows a range of
        return True
    return (low is None or value >= low) and (high is None or value <= high)


def _fresh_checker(user: Any) -> Any:
    """A guardian checker that reads the user's permissions as they are now.

    With guardian's AUTO_PREFETCH a checker would reuse a cache kept on the user object (a
    socket holds one for hours), so it gets a copy without that cache.
    """
    from guardian.core import ObjectPermissionChecker

    if hasattr(user, "_guardian_perms_cache"):
        user = copy.copy(user)
        del user._guardian_perms_cache
    return ObjectPermissionChecker(user)


class UserPolicy(StreamPolicy):
    """`user:<id>`: a user's private stream, readable by that user only."""

    def authorize(self, user: Any, key: str) -> bool:
        return str(user.pk) == key


class TenantPolicy(StreamPolicy):
    """`tenant:<key>`: readable by members, as decided by a host-project callable."""

    #: A callable (user, key) -> bool, or its dotted path.
    is_member: Callable[[Any, str], bool] | str | None = None

    def authorize(self, user: Any, key: str) -> bool:
        check = self.is_member
        if isinstance(check, str):
            check = import_string(check)
        if check is None:
            raise ImproperlyConfigured(f"{type(self).__name__}.is_member is not set")
        return bool(check(user, key))


class StreamKinds:
    """The registered stream kinds and their policies."""

    def __init__(self) -> None:
        self._policies: dict[str, StreamPolicy] = {}

    def register(self, kind: str, policy: type[StreamPolicy] | StreamPolicy) -> None:
        if not _KIND.fullmatch(kind):
            raise ImproperlyConfigured(f"invalid stream kind {kind!r}: must match {KIND_PATTERN}")
        instance = policy() if isinstance(policy, type) else policy
        if not isinstance(instance, StreamPolicy):
            raise ImproperlyConfigured(f"{policy!r} is not a StreamPolicy")
        self._policies[kind] = instance

    def unregister(self, kind: str) -> None:
        self._policies.pop(kind, None)

    def get(self, kind: str) -> StreamPolicy | None:
        policy = self._policies.get(kind)
        if policy is None:
            policy = self._from_settings(kind)
        return policy

    def _from_settings(self, kind: str) -> StreamPolicy | None:
        from .conf import realtime_settings

        path = (realtime_settings.STREAM_POLICIES or {}).get(kind)
        if path is None:
            return None
        policy = import_string(path) if isinstance(path, str) else path
        return policy() if isinstance(policy, type) else policy

    def kinds(self) -> Iterable[str]:
        from .conf import realtime_settings

        return {*self._policies, *(realtime_settings.STREAM_POLICIES or {})}


stream_kinds = StreamKinds()


def stream_policy(kind: str) -> Callable[[type[StreamPolicy]], type[StreamPolicy]]:
    """Class decorator registering a policy for a stream kind."""

    def decorate(policy: type[StreamPolicy]) -> type[StreamPolicy]:
        stream_kinds.register(kind, policy)
        return policy

    return decorate


def next_recheck(now: float, *, first: bool = False) -> float:
    """When a connection next decides its subscriptions again unprompted (inf: never).

    The first one falls anywhere in 0.5-1.5 intervals, so connections that all came back
    with a restarted node do not all ask at once.
    """
    interval = realtime_settings.AUTHZ_RECHECK_INTERVAL
    if not interval:
        return math.inf
    return now + float(interval) * (0.5 + random.random() if first else 1.0)


def reload_user(user: Any) -> Any | None:
    """The user as stored now (None once deleted): a connection's copy of it may be hours old."""
    from django.contrib.auth import get_user_model

    pk = getattr(user, "pk", None)
    return None if pk is None else get_user_model()._default_manager.filter(pk=pk).first()


def signed_out(session: Any, session_key: str | None, user: Any, since: float) -> bool:
    """Whether what a connection was opened with has ended since `since` (a Unix time).

    A session connection: its session is gone (a logout flushes it), has expired, or is now
    another user's. A ticket connection (`session` None): the user logged out after it
    opened. The logout message closes such connections at once; this is the check that
    catches them when that message was lost, and sessions that ran out meanwhile. A
    cookie-only session engine keeps nothing to check.
    """
    if session is not None:
        from django.contrib.auth import SESSION_KEY

        store = getattr(session, "_wrapped", session)  # Channels' scope holds a LazyObject
        if not session_key or type(store).__module__.endswith("signed_cookies"):
            return False
        try:
            # Loaded afresh, as a request would: `exists()` is true of an expired row that
            # `clearsessions` has not removed yet, and a fresh store reads what is stored now.
            data = type(store)(session_key).load()
        except (NotImplementedError, AttributeError, TypeError):  # an engine that cannot tell
            return False
        return str(data.get(SESSION_KEY)) != str(getattr(user, "pk", None))
    from .tickets import logged_out_since

    return logged_out_since(getattr(user, "pk", None), since)


def auth_hash(user: Any) -> str | None:
    """Django's session auth hash of `user` (it changes with the password); None if the user
    model has none."""
    hasher = getattr(user, "get_session_auth_hash", None)
    return hasher() if callable(hasher) else None


def same_password(user: Any, known: str | None) -> bool:
    """Whether `user`'s session auth hash is still `known` (True for a user model without
    one): False once the password changed since the connection was authenticated."""
    from django.utils.crypto import constant_time_compare

    now = auth_hash(user)
    return now is None or known is None or constant_time_compare(now, known)


def _policy_of(stream: str) -> tuple[str | None, Any, str, str]:
    """(None, policy, kind, key) of a stream name, or (the refusal code, None, "", "")."""
    from .protocol import Code
    from .streams import InvalidStreamName, parse_stream

    try:
        kind, key = parse_stream(stream)
    except InvalidStreamName:
        return Code.INVALID_STREAM, None, "", ""
    policy = stream_kinds.get(kind)
    if policy is None:
        return Code.UNKNOWN_STREAM, None, "", ""
    return None, policy, kind, key


def check_stream(user: Any, stream: str) -> str | None:
    """Return None if `user` may read `stream`, else the refusal code (runs policy queries)."""
    from .protocol import Code

    code, policy, kind, key = _policy_of(stream)
    if code is not None:
        return code
    return None if policy.check(user, kind, key) else Code.FORBIDDEN


def streams_access(
    user: Any, streams: Sequence[str], policies: Mapping[str, Any] | None = None
) -> dict[str, tuple[str | None, str | None]]:
    """`stream_access` of every stream, with the streams of one kind decided together
    (`StreamPolicy.access_many`): a request for 20 project streams costs a few queries, not
    sixty. A batch that raises is decided again stream by stream, so only a stream whose
    policy raises on its own is refused (and logged). `policies` gives a stream's policy
    where the caller holds it already (a subscription's, as it was subscribed under)."""
    from .protocol import Code
    from .streams import parse_stream

    decided: dict[str, tuple[str | None, str | None]] = {}
    kinds: dict[tuple[str, int], tuple[Any, list[tuple[str, str]]]] = {}
    for stream in streams:
        try:
            if policies is not None and stream in policies:
                code, policy = None, policies[stream]
                kind, key = parse_stream(stream)
            else:
                code, policy, kind, key = _policy_of(stream)
        except Exception:  # e.g. a STREAM_POLICIES entry that does not import
            logger.exception("policy for %s raised; refusing", stream)
            decided[stream] = (Code.FORBIDDEN, None)
            continue
        if code is not None:
            decided[stream] = (code, None)
        else:
            kinds.setdefault((kind, id(policy)), (policy, []))[1].append((stream, key))
    for (kind, _id), (policy, entries) in kinds.items():
        if len(entries) == 1:
            stream, key = entries[0]
            decided[stream] = _decide(user, policy, kind, key, stream)
            continue
        try:
            audiences = policy.access_many(user, kind, [key for _stream, key in entries])
        except Exception:
            logger.warning("deciding %s streams together failed; one by one", kind, exc_info=True)
            for stream, key in entries:
                decided[stream] = _decide(user, policy, kind, key, stream)
            continue
        for stream, key in entries:
            audience = audiences.get(key)
            decided[stream] = (Code.FORBIDDEN, None) if audience is None else (None, audience)
    return {stream: decided[stream] for stream in streams}


def _decide(
    user: Any, policy: Any, kind: str, key: str, stream: str
) -> tuple[str | None, str | None]:
    """One stream's `policy.access`, as `stream_access` answers it."""
    from .protocol import Code

    try:
        audience = policy.access(user, kind, key)
    except Exception:
        logger.exception("policy for %s raised; refusing", stream)
        return Code.FORBIDDEN, None
    return (Code.FORBIDDEN, None) if audience is None else (None, audience)


def stream_access(user: Any, stream: str) -> tuple[str | None, str | None]:
    """(None, audience) if `user` may read `stream`, else (the refusal code, None).

    The audience is the one whose payload the reader gets ("" for the default payload), as
    `StreamPolicy.access` decides it; runs policy queries. A policy that raises is logged
    and refuses, as on a socket.
    """
    code, policy, kind, key = _policy_of(stream)
    if code is not None:
        return code, None
    return _decide(user, policy, kind, key, stream)
