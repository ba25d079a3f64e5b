"""The demo domain: organizations (tenants), their projects, and the projects' items."""

from __future__ import annotations

from django.conf import settings
from django.db import models

import realtime


class Organization(models.Model):
    name = models.CharField(max_length=100, unique=True)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, related_name="organizations", blank=True
    )

    def __str__(self) -> str:
        return self.name


@realtime.broadcast(
    streams=["project:{pk}", "tenant:{organization_id}"],
    serializer="board.serializers.ProjectSerializer",
    # Every member of the organization reads its stream, not only the project's people.
    stream_serializers={"tenant": "board.serializers.ProjectListingSerializer"},
    # Its owners (ProjectPolicy.audiences) also see who its members are.
    audiences={"owner": "board.serializers.ProjectOwnerSerializer"},
)
class Project(models.Model):
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="projects"
    )
    name = models.CharField(max_length=200)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="owned_projects"
    )
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="projects", blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization", "name"], name="board_project_name")
        ]

    def __str__(self) -> str:
        return self.name


@realtime.broadcast(streams="project:{project_id}", serializer="board.serializers.ItemSerializer")
class Item(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="items")
    title = models.CharField(max_length=500)
    done = models.BooleanField(default=False)
    position = models.IntegerField(default=0)
    # Incremented on every save, so clients can drop an event older than what they hold.
    version = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["position", "pk"]

    def __str__(self) -> str:
        return self.title

    def save(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and not update_fields:
            return  # Django's "save nothing"
        self.version += 1
        if update_fields is not None:
            kwargs["update_fields"] = {*update_fields, "version", "updated_at"}
        super().save(*args, **kwargs)
