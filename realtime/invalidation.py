"""Permission changes and logouts reach the affected users' sockets on every node."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from django.contrib.auth import get_user_model, user_logged_out
from django.db import DEFAULT_DB_ALIAS, transaction
from django.db.models import signals

from .publisher import publisher
from .streams import wire_id

logger = logging.getLogger("realtime.invalidation")


def _send(user_ids: Iterable[Any], message_type: str) -> None:
    from .consumers import user_group

    for user_id in set(user_ids):
        if user_id is not None:
            publisher.send_control(
                user_group(user_id), {"type": message_type, "user": wire_id(user_id)}
            )


class _Changed(threading.local):
    """The users and groups whose decisions must be made again, per database, in this thread.

    Filled by `permissions_changed` and the guardian signals; emptied by the first on-commit
    callback of each database that runs. A revoke of 10,000 permission rows in one
    transaction so sends one message per affected user, and reads each group's members once.
    What a transaction that rolled back added is sent with the next commit of that database
    in this thread: a decision made again for nothing, never one that is missed.
    """

    def __init__(self) -> None:
        self.users: dict[str, set[Any]] = {}
        self.groups: dict[str, set[Any]] = {}


_changed = _Changed()


def permissions_changed(user_ids: Iterable[Any], *, using: str | None = None) -> None:
    """Tell these users' sockets to decide their subscriptions again, after commit.

    `using` is the database whose transaction holds the change (the default one if omitted).
    """
    alias = using or DEFAULT_DB_ALIAS
    _changed.users.setdefault(alias, set()).update(pk for pk in user_ids if pk is not None)
    _flush_on_commit(alias)


def _groups_changed(group_ids: Iterable[Any], using: str) -> None:
    # The members are read after the commit, once per group, by the flush.
    _changed.groups.setdefault(using, set()).update(pk for pk in group_ids if pk is not None)
    _flush_on_commit(using)


def _flush_on_commit(alias: str) -> None:
    # Named functions, not partials: Django logs a failing robust hook by its __qualname__.
    def decide_again() -> None:
        users = _changed.users.pop(alias, set())
        groups = _changed.groups.pop(alias, set())
        if groups:
            users.update(_group_members(groups, alias))
        if users:
            _send(users, "realtime.authz")

    transaction.on_commit(decide_again, using=alias, robust=True)


def _logout_on_commit(user_id: Any, using: str) -> None:
    def close_sockets() -> None:
        _send([user_id], "realtime.logout")

    transaction.on_commit(close_sockets, using=using, robust=True)


def _user_perm_changed(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    permissions_changed([instance.user_id], using=using)


def _perm_row_moving(sender: Any, instance: Any, raw: bool, using: str, **kwargs: Any) -> None:
    # A permission row saved again with another user or group: the one it leaves loses it.
    if raw or instance.pk is None:
        return
    field = "user_id" if hasattr(instance, "user_id") else "group_id"
    old = (
        sender._base_manager.using(using)
        .filter(pk=instance.pk)
        .values_list(field, flat=True)
        .first()
    )
    if old is None or old == getattr(instance, field):
        return
    if field == "user_id":
        permissions_changed([old], using=using)
    else:
        _groups_changed([old], using)


def _group_members(group_ids: Iterable[Any], using: str) -> list[Any]:
    users = get_user_model()._default_manager.db_manager(using)
    return list(users.filter(groups__in=list(group_ids)).values_list("pk", flat=True).distinct())


def _group_perm_changed(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    _groups_changed([instance.group_id], using)


def _group_deleted(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    # Its members lose whatever it granted (object and global permissions), and Django sends
    # no m2m_changed for the membership rows it deletes with it: read them now, before the
    # deletion (pre_delete), while they are still there.
    permissions_changed(_group_members([instance.pk], using), using=using)


def _membership_changed(
    sender: Any,
    instance: Any,
    action: str,
    reverse: bool,
    pk_set: Any,
    using: str,
    **kwargs: Any,
) -> None:
    if action not in ("post_add", "post_remove", "post_clear", "pre_clear"):
        return
    if not reverse:  # user.groups.add(...): the instance is the user
        permissions_changed([instance.pk], using=using)
    elif action == "pre_clear":  # group.user_set.clear(): pk_set is empty, read members now
        members = instance.user_set.using(using).values_list("pk", flat=True)
        permissions_changed(list(members), using=using)
    else:
        permissions_changed(pk_set or [], using=using)


def _group_permissions_changed(
    sender: Any,
    instance: Any,
    action: str,
    reverse: bool,
    pk_set: Any,
    using: str,
    **kwargs: Any,
) -> None:
    # Model-wide permissions of groups: group.permissions (the instance is the group) or
    # permission.group_set (the instance is the permission, pk_set its groups).
    if action not in ("post_add", "post_remove", "post_clear", "pre_clear"):
        return
    if not reverse:
        if action != "pre_clear":
            _groups_changed([instance.pk], using)
    elif action == "pre_clear":  # permission.group_set.clear(): read the groups now
        _groups_changed(list(instance.group_set.using(using).values_list("pk", flat=True)), using)
    elif action != "post_clear":
        _groups_changed(pk_set or [], using)


def _logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        from .tickets import revoke_issued

        revoke_issued(user)  # a ticket fetched before the logout opens nothing after it
        # After the commit, as the session's flush: a socket closed before it could reconnect
        # on the session that is still there (ATOMIC_REQUESTS). Outside a transaction, now.
        _logout_on_commit(user.pk, DEFAULT_DB_ALIAS)


def _user_saved(
    sender: Any,
    instance: Any,
    created: bool,
    using: str,
    update_fields: Any = None,
    **kwargs: Any,
) -> None:
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return  # a login stamps last_login: nothing a decision depends on
    pk = instance.pk
    if not instance.is_active:  # a deactivated user's sockets close as on logout
        _logout_on_commit(pk, using)
    else:  # is_superuser, is_staff or anything a policy reads may have changed
        permissions_changed([pk], using=using)


def _user_deleted(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    _logout_on_commit(instance.pk, using)


def _token_deleted(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    # A DRF token deleted (revoked, or regenerated: a new key is a new row): the streams and
    # held polls it opened decide again now, and end (realtime.httpauth.Credentials).
    permissions_changed([instance.user_id], using=using)


def connect(registry: Any = None) -> None:
    """Wire the signals (called from the app's ready()); `registry` is the app registry to
    find guardian's permission models in (Django's own by default)."""
    from django.contrib.auth.models import Group

    user_model = get_user_model()
    if hasattr(user_model, "groups"):  # a user model without PermissionsMixin has none
        signals.m2m_changed.connect(
            _membership_changed, sender=user_model.groups.through, dispatch_uid="realtime.groups"
        )
    # Model-wide permissions, for policies that read them (user.has_perm("app.view_x")):
    # user.user_permissions and permission.user_set work as group membership does.
    if hasattr(user_model, "user_permissions"):
        signals.m2m_changed.connect(
            _membership_changed,
            sender=user_model.user_permissions.through,
            dispatch_uid="realtime.user_permissions",
        )
    signals.m2m_changed.connect(
        _group_permissions_changed,
        sender=Group.permissions.through,
        dispatch_uid="realtime.group_permissions",
    )
    user_logged_out.connect(_logged_out, dispatch_uid="realtime.logout")
    signals.post_save.connect(_user_saved, sender=user_model, dispatch_uid="realtime.user_saved")
    signals.post_delete.connect(
        _user_deleted, sender=user_model, dispatch_uid="realtime.user_deleted"
    )
    signals.pre_delete.connect(_group_deleted, sender=Group, dispatch_uid="realtime.group_deleted")
    from django.apps import apps

    if apps.is_installed("rest_framework.authtoken"):
        from rest_framework.authtoken import models as authtoken

        # The admin deletes through the proxy: its deletions are sent for it, not for Token.
        for token_model in (authtoken.Token, getattr(authtoken, "TokenProxy", None)):
            if token_model is not None:
                signals.post_delete.connect(
                    _token_deleted,
                    sender=token_model,
                    dispatch_uid=f"realtime.token_deleted.{token_model.__name__}",
                )
    for model, kind in permission_models(registry):
        label = model._meta.label_lower
        signals.pre_save.connect(_perm_row_moving, sender=model, dispatch_uid=f"rt.move.{label}")
        if kind == "user":
            for signal in (signals.post_save, signals.post_delete):
                signal.connect(_user_perm_changed, sender=model, dispatch_uid=f"rt.uop.{label}")
        else:
            for signal in (signals.post_save, signals.pre_delete):
                signal.connect(_group_perm_changed, sender=model, dispatch_uid=f"rt.gop.{label}")


def permission_models(registry: Any = None) -> list[tuple[type[Any], str]]:
    """guardian's object permission models, generic and direct-foreign-key ones, as
    (model, "user" or "group"); empty without guardian."""
    from django.apps import apps

    try:
        from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase
    except ImportError:  # guardian is optional for policies that do not use it
        return []
    found: list[tuple[type[Any], str]] = []
    for model in (registry or apps).get_models():
        if issubclass(model, UserObjectPermissionBase):
            found.append((model, "user"))
        elif issubclass(model, GroupObjectPermissionBase):
            found.append((model, "group"))
    return found


def disconnect(connections: Iterable[tuple[Any, str]], *, code: int | None = None) -> int:
    """Close these (user id, connection id) sockets or SSE streams, on whichever node holds them.

    The message travels through the channel layer on each user's control group; a node closes
    only the connection whose id it holds (WebSocket close code 4000 by default; the client
    reconnects after its backoff). Returns how many were asked to close.
    """
    from .consumers import user_group
    from .protocol import Close

    count = 0
    for user_id, connection_id in connections:
        if user_id is None:
            continue
        publisher.send_control(
            user_group(user_id),
            {
                "type": "realtime.disconnect",
                "user": wire_id(user_id),
                "connection": connection_id,
                "code": code or Close.DISCONNECTED,
            },
        )
        count += 1
    return count
