"""Model registration: which streams a model change goes to, and how each version serializes it."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import connections, models, router, transaction
from django.db.models import signals
from django.utils.module_loading import import_string

from .conf import realtime_settings
from .events import is_valid_type, is_valid_version, variant_key
from .streams import KIND_PATTERN, InvalidStreamName, parse_stream

logger = logging.getLogger("realtime.registry")

ACTIONS = ("created", "updated", "deleted")
_LOADED = "_realtime_loaded"  # the field values the row held when loaded or last committed
_PENDING = "_realtime_pending"  # those of its saves in a transaction not yet committed

StreamsSpec = str | Callable[[Any], Any] | Iterable[str | Callable[[Any], Any]]


class RegistrationError(ValueError):
    """A registration that cannot work; raised at the first save and reported by checks."""


# stream -> events -> variant key -> (type, data). Registrations of other versions are
# variants of one event; one whose version the stream's event already has (a proxy's own
# name on its concrete model's stream) is an event of its own.
Plan = dict[str, list[dict[str, tuple[str, Any]]]]


@dataclass
class Registration:
    """One model registered for one event version."""

    model: Any
    streams: list[str | Callable[[Any], Any]]
    serializer: Any
    actions: frozenset[str]
    version: str
    name: str
    version_field: str | None
    #: {stream kind: serializer} used for the streams of that kind instead of `serializer`
    #: (a redacted payload for a wider audience, such as an organization-wide stream).
    stream_serializers: dict[str, Any] = field(default_factory=dict)
    #: {audience: serializer}: the payload that readers of that audience (a name of their
    #: stream policy's `audiences`) get, such as every field for owners.
    audiences: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    #: `stream_serializers` values resolved (dotted paths imported), by kind, and
    #: `audiences` ones by "@<audience>".
    _resolved: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: Set once every dotted serializer path imported and is usable: saves skip the check.
    _paths_ok: bool = field(default=False, repr=False, compare=False)

    def type_for(self, action: str) -> str:
        return f"{self.version}:{self.name}.{action}"

    def stream_names(self, instance: Any) -> list[str]:
        """Return the streams of an instance, validated, in a stable order without repeats."""
        names: list[str] = []
        for spec in self.streams:
            if isinstance(spec, str):
                try:
                    value = spec.format_map(_Attrs(instance))
                except _NoValue:
                    continue  # a field in the template is None: no such stream
            else:
                value = spec(instance)
            values = [value] if isinstance(value, str) or value is None else list(value)
            for name in values:
                if name is None:
                    continue  # a callable may say "no stream for this instance"
                try:
                    parse_stream(name)
                except InvalidStreamName as exc:
                    raise RegistrationError(
                        f"{_label(self.model)} ({self.version}) streams: {exc}"
                    ) from None
                if name not in names:
                    names.append(name)
        return names

    def payload_key(self, stream: str) -> str | None:
        """The stream kind whose own serializer serves `stream`; None for `serializer`."""
        if not self.stream_serializers:
            return None
        kind = stream.partition(":")[0]
        return kind if kind in self.stream_serializers else None

    def serialize(self, instance: Any, key: str | None = None) -> Any:
        """The payload of `instance` for streams of `payload_key` `key`."""
        serializer = self.resolved_serializer(key)
        if serializer is None:
            return _default_data(instance)
        if isinstance(serializer, type) and _is_drf_serializer(serializer):
            # Building a DRF serializer's fields costs more than using them: keep one
            # instance per thread and call to_representation, as `.data` would.
            cache = self._local.__dict__.setdefault("serializers", {})
            cached = cache.get(key)
            if cached is None:
                cached = cache[key] = serializer()
            return cached.to_representation(instance)
        return serializer(instance)

    def deleted_data(self, pk: Any, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"id": pk}
        if self.version_field:
            data[self.version_field] = getattr(instance, self.version_field, None)
        return data

    @functools.cached_property
    def _serializer(self) -> Any:
        if isinstance(self.serializer, str):
            return import_string(self.serializer)
        return self.serializer

    def resolved_serializer(self, key: str | None = None) -> Any:
        if key is None:
            return self._serializer
        resolved = self._resolved.get(key)
        if resolved is None:
            by_key = self.audiences if key.startswith("@") else self.stream_serializers
            spec = by_key[key.lstrip("@")]
            resolved = self._resolved[key] = import_string(spec) if isinstance(spec, str) else spec
        return resolved

    def audiences_on(self, stream: str) -> list[str]:
        """The audiences of this registration that `stream`'s policy declares, in order.

        None on a stream whose kind has a `stream_serializers` payload: that kind was given a
        narrower payload on purpose, and an audience of the same name there (a policy's
        `owner` meaning something else) must not bring the wider one back.
        """
        if not self.audiences or self.payload_key(stream) is not None:
            return []
        from .policies import stream_kinds

        try:
            policy = stream_kinds.get(stream.partition(":")[0])
        except Exception:  # a STREAM_POLICIES path that does not import (check E013)
            logger.warning("no policy for %s: its events get no audience payloads", stream)
            return []  # the default payload only: never more than every reader may see
        declared = getattr(policy, "audiences", None)
        if not isinstance(declared, dict):
            return []  # not a dict (check E022)
        return [name for name in declared if name in self.audiences]

    def add_to(
        self, plan: Plan, stream: str, action: str, instance: Any, cache: dict[str | None, Any]
    ) -> None:
        """Put the events of `action` on `stream` into `plan`: the payload of this version,
        and one per audience the stream has. `cache` holds the payloads serialized so far
        for this instance (by payload key), so each is serialized once."""
        events = plan.setdefault(stream, [])
        by_key = next((event for event in events if self.version not in event), None)
        if by_key is None:
            by_key = {}
            events.append(by_key)
        type_ = self.type_for(action)
        if action == "deleted":
            by_key.setdefault(self.version, (type_, self.deleted_data(instance.pk, instance)))
            return  # a delete carries the pk (and version) to every audience alike
        key = self.payload_key(stream)
        if key not in cache:
            cache[key] = self.serialize(instance, key)
        by_key.setdefault(self.version, (type_, cache[key]))
        for audience in self.audiences_on(stream):
            key = f"@{audience}"
            if key not in cache:
                cache[key] = self.serialize(instance, key)
            by_key.setdefault(variant_key(self.version, audience), (type_, cache[key]))


class _Attrs(dict):  # type: ignore[type-arg]
    """Lets a stream template such as 'project:{project_id}' read instance attributes."""

    def __init__(self, instance: Any) -> None:
        super().__init__()
        self.instance = instance

    def __missing__(self, key: str) -> Any:
        value = getattr(self.instance, key)
        if value is None:
            raise _NoValue(key)
        return value


class _NoValue(Exception):
    """A template field is None, so the instance has no such stream."""


def _label(model: Any) -> str:
    meta = getattr(model, "_meta", None)
    return meta.label if meta is not None else repr(model)


def _is_drf_serializer(value: Any) -> bool:
    try:
        from rest_framework.serializers import BaseSerializer
    except ImportError:  # pragma: no cover - DRF is a dependency
        return False
    return isinstance(value, type) and issubclass(value, BaseSerializer)


def _default_data(instance: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": instance.pk}
    for f in instance._meta.concrete_fields:
        if f.primary_key:
            continue
        value = f.value_from_object(instance)
        data[f.attname] = value.name if isinstance(value, models.fields.files.FieldFile) else value
    return data


class Registry:
    """All registrations, by model; connects the model signals once per model."""

    def __init__(self) -> None:
        self._by_model: dict[Any, list[Registration]] = {}
        # Per model class: its registrations and, for a proxy, its concrete model's first.
        self._effective: dict[Any, list[Registration]] = {}
        self.problems: list[str] = []  # registrations that could not be stored at all

    def register(
        self,
        model: Any,
        *,
        streams: StreamsSpec,
        serializer: Any = None,
        actions: Iterable[str] = ACTIONS,
        version: str = "v1",
        name: str | None = None,
        version_field: str | None = None,
        stream_serializers: Any = None,
        audiences: Any = None,
    ) -> Registration | None:
        """Register a model; problems are kept for the system check, not raised here."""
        if not (isinstance(model, type) and issubclass(model, models.Model)):
            self.problems.append(f"realtime.register() needs a model class, got {model!r}")
            return None
        meta = model._meta
        if meta.abstract:
            self.problems.append(f"{_label(model)} is abstract and cannot be registered")
            return None
        specs = [streams] if isinstance(streams, str) or callable(streams) else list(streams)
        registration = Registration(
            model=model,
            streams=specs,  # type: ignore[arg-type]
            serializer=serializer,
            actions=frozenset(actions),
            version=version,
            name=name or meta.model_name or "",
            version_field=version_field or ("version" if _has_field(model, "version") else None),
            stream_serializers={} if stream_serializers is None else stream_serializers,
            audiences={} if audiences is None else audiences,
        )
        registration.problems.extend(_static_problems(registration))
        if version_field and not _has_field(model, version_field):
            registration.problems.append(
                f"{_label(model)} ({version}): version_field {version_field!r} is not a field"
            )
        existing = self._by_model.setdefault(model, [])
        if any(r.version == version for r in existing):
            registration.problems.append(
                f"{_label(model)} is registered twice for version {version!r}"
            )
        existing.append(registration)
        self._effective.clear()
        _connect(model)
        return registration

    def unregister(self, model: Any, version: str | None = None) -> None:
        """Remove a model's registrations (one version, or all)."""
        regs = self._by_model.get(model, [])
        kept = [r for r in regs if version is not None and r.version != version]
        if kept:
            self._by_model[model] = kept
        else:
            self._by_model.pop(model, None)
        self._effective.clear()
        for cls in [model, *_proxies_of(model)]:
            if not self.for_model(cls):  # a proxy of a model still registered stays connected
                _disconnect(cls)

    def for_model(self, model: Any) -> list[Registration]:
        """The registrations a change to an instance of `model` goes through.

        A proxy's rows are its concrete model's, so a proxy gets the concrete model's
        registrations, then those of each proxy on the way to it (its own included).
        """
        regs = self._effective.get(model)
        if regs is None:
            regs = self._effective[model] = [
                reg for cls in _proxy_chain(model) for reg in self._by_model.get(cls, [])
            ]
        return regs

    def all(self) -> list[Registration]:
        return [r for regs in self._by_model.values() for r in regs]


def _proxy_chain(model: Any) -> list[Any]:
    """The model classes whose registrations a model's instances go through, concrete first."""
    meta = getattr(model, "_meta", None)
    if meta is None or not meta.proxy:
        return [model]
    concrete = meta.concrete_model
    return [
        cls
        for cls in reversed(model.__mro__)
        if "_meta" in cls.__dict__
        and not cls._meta.abstract
        and cls._meta.concrete_model is concrete
    ]


def _proxies_of(model: Any) -> list[Any]:
    """Every proxy model defined so far whose chain includes `model`."""
    found: list[Any] = []
    todo = list(model.__subclasses__())
    while todo:
        cls = todo.pop()
        meta = cls.__dict__.get("_meta")
        if meta is not None and meta.proxy and meta.concrete_model is model._meta.concrete_model:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


def _has_field(model: Any, name: str) -> bool:
    try:
        model._meta.get_field(name)
    except Exception:
        return False
    return True


def _usable_serializer(value: Any) -> bool:
    return value is None or callable(value)


def serializer_problem(reg: Registration) -> str | None:
    """Resolve dotted serializer paths; return a problem if one cannot be used."""
    if reg._paths_ok:  # checked at every save: once they resolved, they stay resolved
        return None
    label = f"{_label(reg.model)} ({reg.version})"
    specs: list[tuple[str | None, Any]] = [(None, reg.serializer)]
    if isinstance(reg.stream_serializers, dict):
        specs += [(k, v) for k, v in reg.stream_serializers.items() if isinstance(k, str)]
    if isinstance(reg.audiences, dict):
        specs += [(f"@{k}", v) for k, v in reg.audiences.items() if isinstance(k, str)]
    problems = []
    for key, spec in specs:
        if not isinstance(spec, str):
            continue
        if key is None:
            name = "serializer"
        elif key.startswith("@"):
            name = f"audiences[{key[1:]!r}]"
        else:
            name = f"stream_serializers[{key!r}]"
        try:
            value = reg.resolved_serializer(key)
        except ImportError as exc:
            problems.append(f"{label}: {name} {spec!r} cannot be imported ({exc})")
            continue
        if not _usable_serializer(value):
            problems.append(f"{label}: {name} {spec!r} is neither a serializer class nor callable")
    reg._paths_ok = not problems
    return "; ".join(problems) or None


def _static_problems(reg: Registration) -> list[str]:
    problems: list[str] = []
    label = f"{_label(reg.model)} ({reg.version})"
    if not is_valid_version(reg.version):
        problems.append(f"{label}: version must look like 'v1', got {reg.version!r}")
    bad_actions = reg.actions - set(ACTIONS)
    if bad_actions or not reg.actions:
        problems.append(
            f"{label}: actions must be a non-empty subset of {ACTIONS}, got {sorted(reg.actions)}"
        )
    if is_valid_version(reg.version) and not is_valid_type(reg.type_for("created")):
        problems.append(f"{label}: event name {reg.name!r} does not make a valid event type")
    if not reg.streams:
        problems.append(f"{label}: no streams given")
    for spec in reg.streams:
        if not (isinstance(spec, str) or callable(spec)):
            problems.append(
                f"{label}: a stream must be a template string or a callable, not {spec!r}"
            )
    if not isinstance(reg.serializer, str) and not _usable_serializer(reg.serializer):
        problems.append(
            f"{label}: serializer must be a DRF serializer class, a callable or a dotted path, "
            f"not {reg.serializer!r}"
        )
    problems += _audience_problems(reg, label)
    if not isinstance(reg.stream_serializers, dict):
        problems.append(
            f"{label}: stream_serializers must be a dict of stream kind to serializer, not "
            f"{reg.stream_serializers!r}"
        )
        return problems
    for kind, spec in reg.stream_serializers.items():
        if not (isinstance(kind, str) and re.fullmatch(KIND_PATTERN, kind)):
            problems.append(f"{label}: stream_serializers key {kind!r} is not a stream kind")
        elif spec is None:  # as `serializer=None`, it would send every field: the opposite
            problems.append(
                f"{label}: stream_serializers[{kind!r}] is None: name the serializer of the "
                "redacted payload (None would send every concrete field)"
            )
        elif not isinstance(spec, str) and not _usable_serializer(spec):
            problems.append(
                f"{label}: stream_serializers[{kind!r}]: a serializer must be a DRF serializer "
                f"class, a callable or a dotted path, not {spec!r}"
            )
    return problems


def _audience_problems(reg: Registration, label: str) -> list[str]:
    from .policies import is_valid_audience

    if not isinstance(reg.audiences, dict):
        kind = type(reg.audiences).__name__
        return [f"{label}: audiences must be a dict of audience to serializer, not {kind}"]
    problems = []
    for name, spec in reg.audiences.items():
        if not is_valid_audience(name):
            problems.append(
                f"{label}: audiences key {name!r} is not an audience name: use 1-32 lowercase "
                "letters, digits or '_', starting with a letter"
            )
        elif not isinstance(spec, str) and not _usable_serializer(spec):
            problems.append(
                f"{label}: audiences[{name!r}]: a serializer must be a DRF serializer class, a "
                f"callable, a dotted path or None, not {spec!r}"
            )
    return problems


registry = Registry()


def register(model: Any, **options: Any) -> Registration | None:
    """Broadcast a model's changes; see `broadcast` for the options."""
    return registry.register(model, **options)


def broadcast(
    *,
    streams: StreamsSpec,
    serializer: Any = None,
    actions: Iterable[str] = ACTIONS,
    version: str = "v1",
    name: str | None = None,
    version_field: str | None = None,
    stream_serializers: Any = None,
    audiences: Any = None,
) -> Callable[[Any], Any]:
    """Class decorator registering a model: its saves and deletes become events on `streams`.

    Parameters
    ----------
    streams:
        A template such as ``"project:{project_id}"``, a callable ``instance -> name | names``,
        or a list of either.
    serializer:
        A DRF serializer class, a callable ``instance -> data``, a dotted path to either, or
        None for the model's concrete fields.
    actions:
        Which of ``created``, ``updated``, ``deleted`` are sent.
    version:
        The event version (``v1``); register again with another serializer for ``v2``.
    name:
        The noun in the event type (``item`` in ``v1:item.updated``); the model name by default.
    version_field:
        A field whose value deleted events also carry, so clients can drop stale versions;
        a field named ``version`` is used when this is not given.
    stream_serializers:
        ``{stream kind: serializer}`` (each as ``serializer`` may be): the streams of that
        kind get this payload instead, such as a redacted one for an organization-wide
        stream whose readers may not see every field. Deletes carry the pk (and
        ``version_field``) on every stream.
    audiences:
        ``{audience: serializer}`` (each as ``serializer`` may be, None for every concrete
        field): readers whose stream policy puts them in that audience (its ``audiences``)
        get this payload, serialized once per event and audience; the others get the
        stream's payload. Deletes carry the same data to every audience.
    """

    def decorate(model: Any) -> Any:
        registry.register(
            model,
            streams=streams,
            serializer=serializer,
            actions=actions,
            version=version,
            name=name,
            version_field=version_field,
            stream_serializers=stream_serializers,
            audiences=audiences,
        )
        return model

    return decorate


# -- signal wiring -------------------------------------------------------------------------


def _connect(model: Any) -> None:
    # Django sends a proxy's signals with the proxy as sender: its proxies are connected too,
    # those defined later when they are prepared (`_on_class_prepared`).
    for cls in [model, *_proxies_of(model)]:
        uid = f"realtime:{_label(cls)}"
        signals.post_init.connect(_on_init, sender=cls, dispatch_uid=uid, weak=False)
        signals.pre_save.connect(_on_pre_save, sender=cls, dispatch_uid=uid, weak=False)
        signals.pre_delete.connect(_on_pre_delete, sender=cls, dispatch_uid=uid, weak=False)
        signals.post_save.connect(_on_save, sender=cls, dispatch_uid=uid, weak=False)
        signals.post_delete.connect(_on_delete, sender=cls, dispatch_uid=uid, weak=False)
        _wrap_save_base(cls)
        _wrap_refresh_from_db(cls)


def _on_class_prepared(sender: Any, **kwargs: Any) -> None:
    # A proxy of a registered model, defined after the registration.
    if sender._meta.proxy and registry.for_model(sender):
        _connect(sender)


signals.class_prepared.connect(_on_class_prepared, dispatch_uid="realtime:proxies", weak=False)


def _disconnect(model: Any) -> None:
    uid = f"realtime:{_label(model)}"
    signals.post_init.disconnect(sender=model, dispatch_uid=uid)
    signals.pre_save.disconnect(sender=model, dispatch_uid=uid)
    signals.pre_delete.disconnect(sender=model, dispatch_uid=uid)
    signals.post_save.disconnect(sender=model, dispatch_uid=uid)
    signals.post_delete.disconnect(sender=model, dispatch_uid=uid)


def _wrap_save_base(model: Any) -> None:
    # In autocommit mode Django sends post_save after the save's own transaction has
    # committed; wrapping save_base keeps the change and its event in one transaction.
    original = model.__dict__.get("save_base") or model.save_base
    if getattr(original, "_realtime_wrapped", False):
        return

    @functools.wraps(original)
    def save_base(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("raw") or not realtime_settings.ENABLED or not registry.for_model(type(self)):
            return original(self, *args, **kwargs)
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        if connections[using].in_atomic_block:
            return original(self, *args, **kwargs)
        with transaction.atomic(using=using, savepoint=False):
            return original(self, *args, **kwargs)

    save_base._realtime_wrapped = True  # type: ignore[attr-defined]
    model.save_base = save_base


def _wrap_refresh_from_db(model: Any) -> None:
    # `refresh_from_db` loads a second instance and copies its values over: without this,
    # the instance would keep the values it was loaded with as those of its row, and a move
    # after the refresh would send its `deleted` to a stream the row has already left.
    original = model.__dict__.get("refresh_from_db") or model.refresh_from_db
    if getattr(original, "_realtime_wrapped", False):
        return

    @functools.wraps(original)
    def refresh_from_db(
        self: Any, using: Any = None, fields: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        result = original(self, using, fields, *args, **kwargs)
        if realtime_settings.ENABLED and registry.for_model(type(self)):
            _refreshed(self, fields)
        return result

    refresh_from_db._realtime_wrapped = True  # type: ignore[attr-defined]
    model.refresh_from_db = refresh_from_db


def _refreshed(instance: Any, fields: Any) -> None:
    """Record the values a refresh read as what the row holds (pending until commit in a
    transaction, as a save's)."""
    alias = instance._state.db
    if alias is None or instance.pk is None:
        return
    values, concrete = instance.__dict__, _attnames(type(instance))
    names = concrete if fields is None else _attnames_of(type(instance), fields) & set(concrete)
    read = {name: values[name] for name in names if name in values}
    _remember(instance, {**(_stored(instance, alias) or {}), **read}, alias)


_ATTNAMES: dict[Any, tuple[str, ...]] = {}


def _attnames(model: Any) -> tuple[str, ...]:
    names = _ATTNAMES.get(model)
    if names is None:
        names = _ATTNAMES[model] = tuple(f.attname for f in model._meta.concrete_fields)
    return names


def _snapshot(instance: Any) -> dict[str, Any]:
    values = instance.__dict__
    return {name: values[name] for name in _attnames(type(instance)) if name in values}


def _on_init(sender: Any, instance: Any, **kwargs: Any) -> None:
    if instance.pk is not None:
        instance.__dict__[_LOADED] = _snapshot(instance)


def _on_pre_save(sender: Any, instance: Any, raw: bool, using: str, **kwargs: Any) -> None:
    if not raw:
        _read_deferred(sender, instance, using)


def _on_pre_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    _read_deferred(sender, instance, using)
    if realtime_settings.ENABLED and not instance._state.adding:
        # After the delete, a deferred field can no longer be read (Django would query the
        # row and find none), yet the event's streams and data may need it: read them now.
        deferred = instance.get_deferred_fields()
        if deferred:
            # Already gone: the delete removes nothing, as Django's own would.
            with contextlib.suppress(ObjectDoesNotExist):
                instance.refresh_from_db(using=using, fields=sorted(deferred))


def _read_deferred(sender: Any, instance: Any, using: str) -> None:
    # An instance loaded with deferred fields knows nothing of their stored values; one about
    # to be saved or deleted with such a field set since reads them first, so a move is seen
    # and a delete goes to the row's streams.
    if instance._state.adding or not realtime_settings.ENABLED:
        return
    stored = _stored(instance, using)
    if stored is None:
        return
    values = instance.__dict__
    missing = [name for name in _attnames(type(instance)) if name in values and name not in stored]
    if missing:
        row = sender._base_manager.using(using).filter(pk=instance.pk).values(*missing).first()
        if row is not None:
            stored.update(row)


def _stored(instance: Any, using: str) -> dict[str, Any] | None:
    """The field values the instance's row holds, as far as the instance knows.

    Those of its newest save in a transaction still open that was not rolled back (its commit
    hook is still queued); else those it was loaded or last committed with.
    """
    pending = instance.__dict__.get(_PENDING)
    while pending:
        values, alias, index, hook = pending[-1]
        queued = connections[alias].run_on_commit
        # A rollback drops the hooks queued since its savepoint, and only those, so a hook
        # still at its index is still queued; a dropped one's save is undone, and the save
        # before it (if its hook is queued) is what the row holds.
        if alias == using and index < len(queued) and queued[index][1] is hook:
            return values  # type: ignore[no-any-return]
        pending.pop()
    return instance.__dict__.get(_LOADED)


def _remember(instance: Any, values: dict[str, Any], using: str) -> None:
    """Record what the row holds after a save: now for this transaction, for good at commit."""
    connection = connections[using]
    if not connection.in_atomic_block:
        instance.__dict__[_LOADED] = values
        instance.__dict__.pop(_PENDING, None)
        return

    def saved_row_committed() -> None:
        instance.__dict__[_LOADED] = values
        pending = instance.__dict__.get(_PENDING) or []
        for position, entry in enumerate(pending):
            if entry[3] is saved_row_committed:  # this save and those before it are in
                del pending[: position + 1]
                break

    transaction.on_commit(saved_row_committed, using=using)
    index = len(connection.run_on_commit) - 1
    pending = instance.__dict__.setdefault(_PENDING, [])
    pending.append((values, using, index, saved_row_committed))


def _as_stored(instance: Any, stored: dict[str, Any], keep: frozenset[str] = frozenset()) -> Any:
    """The instance with `stored` values for every field that differs from them (except those
    in `keep`), as a copy; the instance itself when none differs."""
    values = instance.__dict__
    changed = {k for k, v in stored.items() if k not in keep and values.get(k, v) != v}
    if not changed:
        return instance
    copy = instance.__class__.__new__(instance.__class__)
    copy.__dict__.update(values)
    copy.__dict__.update({k: stored[k] for k in changed})
    copy._state = type(instance._state)()
    copy._state.db, copy._state.adding = instance._state.db, False
    # Related objects cached for a foreign key that changed belong to the other value.
    cache = dict(instance._state.fields_cache)
    for f in instance._meta.concrete_fields:
        if f.is_relation and f.attname in changed:
            cache.pop(f.name, None)
    copy._state.fields_cache = cache
    return copy


def _attnames_of(model: Any, names: Iterable[str]) -> frozenset[str]:
    """The attnames of fields named by name or attname (as `update_fields` may)."""
    result = set()
    for name in names:
        try:
            result.add(model._meta.get_field(name).attname)
        except Exception:
            result.add(name)
    return frozenset(result)


def _on_save(
    sender: Any,
    instance: Any,
    created: bool,
    raw: bool,
    using: str,
    update_fields: Any = None,
    **kwargs: Any,
) -> None:
    if raw or not realtime_settings.ENABLED:
        return
    regs = registry.for_model(sender)
    if not regs:
        return
    stored = None if created else _stored(instance, using)
    new = old = instance
    updated: frozenset[str] | None = None
    if stored:
        if update_fields is not None:
            # Only these fields were written: the row keeps its stored values for the others,
            # whatever the instance holds for them in memory.
            updated = _attnames_of(sender, update_fields)
            new = _as_stored(instance, stored, keep=updated)
        old = _as_stored(instance, stored)
    plan: Plan = {}
    for reg in regs:
        _raise_problems(reg)
        new_streams = reg.stream_names(new)
        old_streams = new_streams if old is new else reg.stream_names(old)
        cache: dict[str | None, Any] = {}  # payload key -> payload, serialized once each
        for stream in dict.fromkeys([*old_streams, *new_streams]):
            if stream in new_streams:
                action = "created" if created or stream not in old_streams else "updated"
            else:
                action = "deleted"
            if action in reg.actions:
                reg.add_to(plan, stream, action, new, cache)
    _append([plan], using)
    if updated is None or stored is None:
        _remember(instance, _snapshot(instance), using)
    else:
        values = instance.__dict__
        _remember(instance, {**stored, **{k: values[k] for k in updated if k in values}}, using)


def _on_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    if not realtime_settings.ENABLED:
        return
    if registry.for_model(sender):
        # The row's streams, not the ones of a change the instance holds but never saved.
        stored = _stored(instance, using)
        _append([_plan(instance if not stored else _as_stored(instance, stored), "deleted")], using)


def _plan(instance: Any, action: str) -> Plan:
    """The events of one action on one instance: every registration's streams and versions."""
    regs = registry.for_model(type(instance))
    if not regs:
        raise RegistrationError(f"{_label(type(instance))} is not registered for realtime")
    plan: Plan = {}
    for reg in regs:
        _raise_problems(reg)
        if action not in reg.actions:
            continue
        cache: dict[str | None, Any] = {}  # payload key -> payload, serialized once each
        for stream in reg.stream_names(instance):
            reg.add_to(plan, stream, action, instance, cache)
    return plan


def emit_instances(
    instances: Iterable[Any], action: str = "updated", *, using: str | None = None
) -> int:
    """Log and publish model events for instances changed without signals.

    Returns the number of events logged (one per instance and stream).

    For `bulk_create` (action "created") and `queryset.update()` (re-read the rows, then
    action "updated"); each instance goes to the streams and versions of its registrations,
    all in one transaction (the current one, if any).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    instances = list(instances)
    if not instances:
        return 0
    plans = [_plan(instance, action) for instance in instances]
    written = _append(plans, using or instances[0]._state.db)
    if action != "deleted":
        # These rows now hold the instances' values (`bulk_create` leaves no snapshot: its
        # instances had no pk when made), so a later save that moves one is seen as a move.
        for instance in instances:
            alias = using or instance._state.db or router.db_for_write(type(instance))
            _remember(instance, _snapshot(instance), alias)
    return len(written)


def _raise_problems(reg: Registration) -> None:
    problems = [*reg.problems, *filter(None, [serializer_problem(reg)])]
    if problems:
        raise RegistrationError("; ".join(problems))


def _append(plans: list[Plan], using: str | None) -> list[Any]:
    from .log import Pending, append

    default = realtime_settings.DEFAULT_VERSION
    pending = []
    for plan in plans:
        for stream, events in plan.items():
            for by_version in events:
                primary = default if default in by_version else next(iter(by_version))
                type_, data = by_version[primary]
                variants = {v: td for v, td in by_version.items() if v != primary}
                pending.append(Pending(stream, type_, data, variants))
    return append(pending, using=using)
