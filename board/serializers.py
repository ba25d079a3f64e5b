from typing import Any

from rest_framework import serializers

from .models import Item, Project


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "organization", "name", "owner"]
        read_only_fields = ["owner"]


class ProjectOwnerSerializer(ProjectSerializer):
    """A project as its owner sees it, over REST and on its stream (the `owner` audience):
    with its members, which its other readers are not shown."""

    members = serializers.PrimaryKeyRelatedField[Any](  # users
        many=True, read_only=True
    )

    class Meta(ProjectSerializer.Meta):
        fields = [*ProjectSerializer.Meta.fields, "members"]


class ProjectListingSerializer(serializers.ModelSerializer):
    """A project as its organization's stream shows it: every member reads that stream, but
    only the project's owner and members may see the project (REST answers 404 to the
    others), so it names the project and nothing more. Clients refetch their list."""

    class Meta:
        model = Project
        fields = ["id", "organization"]


class ProjectUpdateSerializer(ProjectSerializer):
    """A project stays in its organization: moving it would hand it to another tenant."""

    class Meta(ProjectSerializer.Meta):
        read_only_fields = ["owner", "organization"]


class ItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = Item
        fields = ["id", "project", "title", "done", "position", "version", "updated_at"]
        read_only_fields = ["version", "updated_at"]


class ItemWriteSerializer(ItemSerializer):
    class Meta(ItemSerializer.Meta):
        read_only_fields = ["project", "version", "updated_at"]
