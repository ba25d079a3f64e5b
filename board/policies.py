"""Who may read the demo's streams."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connections, router
from django.db.models.signals import m2m_changed, post_delete, pre_delete
from django.dispatch import receiver

import realtime
from realtime.policies import (
    ObjectPolicy,
    TenantPolicy,
    UserPolicy,
    fits_integer_column,
    stream_policy,
)

from .models import Organization, Project


@stream_policy("project")
class ProjectPolicy(ObjectPolicy):
    """`project:<pk>`: users with guardian's `board.view_project` on that project."""

    model = Project
    permission = "board.view_project"
    client_events = ("v1:typing.started", "v1:typing.stopped")
    presence = True
    # Who may delete the project (its owner, and superusers) gets the owner's payload of its
    # events (`ProjectOwnerSerializer`, with the members); every other reader the default one.
    audiences = {"owner": "board.delete_project"}

    def clean_client_event(self, user: Any, stream: str, event_type: str, data: Any) -> Any:
        # Typing says at most which field: any other key would reach every member as sent.
        field = data.get("field") if isinstance(data, dict) else None
        if field is not None and not (isinstance(field, str) and len(field) <= 50):
            raise ValueError("'field' must be a string of at most 50 characters")
        return {} if field is None else {"field": field}


def is_member(user: Any, key: str) -> bool:
    """Whether `user` belongs to the organization whose pk is `key`."""
    if not (key.isascii() and key.isdigit()):
        return False
    pk = int(key)
    alias = router.db_for_read(Organization)
    if not fits_integer_column(connections[alias], Organization._meta.pk, pk):
        return False  # names no row, and would not bind (SQLite: OverflowError)
    return (
        Organization.members.through.objects.using(alias)
        .filter(organization_id=pk, user_id=user.pk)
        .exists()
    )


@stream_policy("tenant")
class OrganizationPolicy(TenantPolicy):
    """`tenant:<organization pk>`: members of the organization."""

    is_member = staticmethod(is_member)


stream_policy("user")(UserPolicy)


def tenant_of(user: Any) -> str | None:
    """The organization a connection belongs to, for Connection rows (the first one)."""
    pk = user.organizations.order_by("pk").values_list("pk", flat=True).first()
    return None if pk is None else str(pk)


@receiver(m2m_changed, sender=Project.members.through, dispatch_uid="board.project_members")
def _project_members_changed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: Any, **kwargs: Any
) -> None:
    # The owner's payload of a project lists its members: a change to them is an update of
    # the project (no save, so no signal of its own), logged in the same transaction.
    if reverse and action == "pre_clear":  # a user's projects are about to go: note which
        instance._board_cleared_projects = list(instance.projects.values_list("pk", flat=True))
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    if not reverse:
        projects = [instance]
    else:
        pks = (
            instance.__dict__.pop("_board_cleared_projects", ())
            if action == "post_clear"
            else pk_set
        )
        projects = list(Project.objects.filter(pk__in=list(pks or ())))
    if projects:
        realtime.emit_instances(projects, "updated")


@receiver(pre_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="board.member_deleting")
def _member_deleting(sender: Any, instance: Any, **kwargs: Any) -> None:
    # A deleted user's memberships go by cascade, with no m2m_changed: note the projects,
    # whose owner's payload (and ETag) must follow, while their rows are still there.
    instance._board_member_of = list(instance.projects.values_list("pk", flat=True))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="board.member_deleted")
def _member_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    # After the cascade, in the delete's transaction: the event shows the members left.
    pks = instance.__dict__.pop("_board_member_of", ())
    if pks:
        realtime.emit_instances(list(Project.objects.filter(pk__in=pks)), "updated")


@receiver(m2m_changed, sender=Organization.members.through, dispatch_uid="board.org_members")
def _members_changed(
    sender: Any, instance: Any, action: str, reverse: bool, pk_set: Any, **kwargs: Any
) -> None:
    # Organization membership decides the tenant stream: re-check the users it touched.
    if action in ("post_add", "post_remove"):
        realtime.permissions_changed([instance.pk] if reverse else list(pk_set or []))
    elif action == "pre_clear":
        users = [instance.pk] if reverse else list(instance.members.values_list("pk", flat=True))
        realtime.permissions_changed(users)
