"""Project ownership and membership, kept in step with guardian object permissions."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from guardian.shortcuts import assign_perm, get_users_with_perms, remove_perm

from notifications import notify

from .models import Project

MEMBER_PERMS = ("board.view_project", "board.change_project")


OWNER_PERMS = (*MEMBER_PERMS, "board.delete_project")


@transaction.atomic
def create_project(*, organization: Any, name: str, owner: Any) -> Project:
    """Create a project; its owner gets the member permissions on it."""
    project = Project.objects.create(organization=organization, name=name, owner=owner)
    grant_owner(project, owner)
    return project


def grant_owner(project: Project, user: Any) -> None:
    """Give `user` what the owner of `project` may do."""
    for perm in OWNER_PERMS:
        assign_perm(perm, user, project)


def grant_member(project: Project, user: Any, *, by: Any = None) -> None:
    """Give a member of `project` (in its `members` already) their permissions, and tell them."""
    for perm in MEMBER_PERMS:
        assign_perm(perm, user, project)
    notify(user, "added you to", actor=by or project.owner, target=project)


@transaction.atomic
def add_member(project: Project, user: Any, *, by: Any = None) -> None:
    """Make `user` a member of `project` with view and change permissions (and tell them)."""
    if project.members.filter(pk=user.pk).exists():
        return
    project.members.add(user)
    grant_member(project, user, by=by)


def readers(project: Project) -> Any:
    """The users who may view `project` (guardian object permission, direct or via groups)."""
    return get_users_with_perms(project, only_with_perms_in=["view_project"], with_group_users=True)


@transaction.atomic
def remove_member(project: Project, user: Any) -> None:
    """Take `user` out of `project` and revoke the member permissions."""
    project.members.remove(user)
    for perm in MEMBER_PERMS:
        remove_perm(perm, user, project)
