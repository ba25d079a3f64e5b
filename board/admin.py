from django.contrib import admin
from guardian.admin import GuardedModelAdmin

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


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ["title", "project", "done", "position", "version", "updated_at"]
    list_filter = ["done", "project"]
    search_fields = ["title"]
