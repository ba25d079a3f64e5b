"""Permission changes and logouts reach the affected users' sockets on every node."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.contrib.auth import get_user_model, user_logged_out
from django.db import transaction
from django.db.models import signals

from .publisher import publisher

logger = logging.getLogger("realtime.invalidation")


def _send(user_ids: Iterable[Any], message_type: str) -> None:
    from .consumers import user_group

    for user_id in set(user_ids):
        if user_id is not None:
            publisher.send_control(user_group(user_id), {"type": message_type, "user": user_id})


def permissions_changed(user_ids: Iterable[Any]) -> None:
    """Tell these users' sockets to decide their subscriptions again, after commit."""
    ids = list(user_ids)
    transaction.on_commit(lambda: _send(ids, "realtime.authz"), robust=True)


def _user_perm_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    permissions_changed([instance.user_id])


def _group_members(group_id: Any) -> list[Any]:
    users = get_user_model()._default_manager.filter(groups=group_id)
    return list(users.values_list("pk", flat=True))


def _group_perm_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    # Connected to pre_delete, not post_delete: deleting a group removes its members' links
    # before its object permissions, so afterwards it would seem to have no members.
    permissions_changed(_group_members(instance.group_id))


def _group_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    # Its members lose whatever it granted (object and global permissions), and Django sends
    # no m2m_changed for the membership rows it deletes with it.
    permissions_changed(_group_members(instance.pk))


def _membership_changed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: Any, **kwargs: Any
) -> None:
    if action not in ("post_add", "post_remove", "post_clear", "pre_clear"):
        return
    if not reverse:  # user.groups.add(...): the instance is the user
        permissions_changed([instance.pk])
    elif action == "pre_clear":  # group.user_set.clear(): pk_set is empty, read members now
        permissions_changed(list(instance.user_set.values_list("pk", flat=True)))
    else:
        permissions_changed(pk_set or [])


def _logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        _send([user.pk], "realtime.logout")


def _user_saved(
    sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any
) -> None:
    if created or (update_fields is not None and set(update_fields) <= {"last_login"}):
        return  # a login stamps last_login: nothing a decision depends on
    pk = instance.pk
    if not instance.is_active:  # a deactivated user's sockets close as on logout
        transaction.on_commit(lambda: _send([pk], "realtime.logout"), robust=True)
    else:  # is_superuser, is_staff or anything a policy reads may have changed
        permissions_changed([pk])


def _user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    pk = instance.pk
    transaction.on_commit(lambda: _send([pk], "realtime.logout"), robust=True)


def connect() -> None:
    """Wire the signals (called from the app's ready())."""
    from django.contrib.auth.models import Group

    user_model = get_user_model()
    signals.m2m_changed.connect(
        _membership_changed, sender=user_model.groups.through, dispatch_uid="realtime.groups"
    )
    user_logged_out.connect(_logged_out, dispatch_uid="realtime.logout")
    signals.post_save.connect(_user_saved, sender=user_model, dispatch_uid="realtime.user_saved")
    signals.post_delete.connect(
        _user_deleted, sender=user_model, dispatch_uid="realtime.user_deleted"
    )
    signals.pre_delete.connect(_group_deleted, sender=Group, dispatch_uid="realtime.group_deleted")
    try:
        from guardian.models import GroupObjectPermission, UserObjectPermission
    except ImportError:  # guardian is optional for policies that do not use it
        return
    for signal in (signals.post_save, signals.post_delete):
        signal.connect(_user_perm_changed, sender=UserObjectPermission, dispatch_uid="rt.uop")
    for signal in (signals.post_save, signals.pre_delete):
        signal.connect(_group_perm_changed, sender=GroupObjectPermission, dispatch_uid="rt.gop")


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
                "user": user_id,
                "connection": connection_id,
                "code": code or Close.DISCONNECTED,
            },
        )
        count += 1
    return count
