from typing import Any

from django.contrib import admin
from guardian.admin import GuardedModelAdmin
from guardian.shortcuts import remove_perm

from .membership import MEMBER_PERMS, grant_member, grant_owner, remove_member
from .models import Item, Organization, Project


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["name"]
    filter_horizontal = ["members"]


@admin.register(Project)
class ProjectAdmin(GuardedModelAdmin):
    list_display = ["name", "organization", "owner"]
    list_filter = ["organization"]
    search_fields = ["name"]

    def save_related(self, request: Any, form: Any, formsets: Any, change: bool) -> None:
        # Access is guardian's object permissions, which board.membership keeps in step with
        # the owner and the members: the form's m2m save alone would change neither.
        project = form.instance
        before = set(project.members.all()) if change else set()
        super().save_related(request, form, formsets, change)
        after = set(project.members.all())
        if not change or "owner" in form.changed_data:
            grant_owner(project, project.owner)
            previous = form.initial.get("owner") if change else None
            if previous is not None and previous != project.owner.pk:
                old = type(project.owner)._default_manager.get(pk=previous)
                remove_perm("board.delete_project", old, project)
                if old not in after:
                    for perm in MEMBER_PERMS:
                        remove_perm(perm, old, project)
        for user in after - before:
            grant_member(project, user, by=request.user)
        for user in before - after:
            if user != project.owner:  # the owner's access does not come from membership
                remove_member(project, user)


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ["title", "project", "done", "position", "version", "updated_at"]
    list_filter = ["done", "project"]
    search_fields = ["title"]
