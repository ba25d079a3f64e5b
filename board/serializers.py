from rest_framework import serializers

from .models import Item, Project


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "organization", "name", "owner"]


class ItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = Item
        fields = ["id", "project", "title", "done", "position", "version", "updated_at"]
        read_only_fields = ["version", "updated_at"]
