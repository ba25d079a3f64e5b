from rest_framework import serializers

from .models import Item, Project


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "organization", "name", "owner"]
        read_only_fields = ["owner"]


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
