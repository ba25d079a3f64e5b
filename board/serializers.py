from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.validators import UniqueTogetherValidator

from .models import Item, Organization, Project

#: What the serializer's own check of `board_project_name` says, and a race past it too.
NAME_TAKEN = UniqueTogetherValidator.message.format(field_names="organization, name")
NOT_A_MEMBER = "You are not a member of that organization."


class MemberOrganizationField(serializers.PrimaryKeyRelatedField[Organization]):
    """An organization the requesting user is a member of; any other pk is a 403.

    Decided as the field is read, before the serializer's validators: a non-member got a 400
    for a project name taken in the organization and a 403 otherwise (so learnt its projects'
    names), and a 400 for an organization that does not exist (so learnt which ones do).
    """

    def get_queryset(self) -> Any:
        request = self.context.get("request")
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return Organization.objects.none()
        return Organization.objects.filter(members=user)

    def to_internal_value(self, data: Any) -> Any:
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            if exc.get_codes() == ["does_not_exist"]:  # missing or foreign: one answer
                raise PermissionDenied(NOT_A_MEMBER) from None
            raise


class ProjectSerializer(serializers.ModelSerializer):
    organization = MemberOrganizationField(queryset=Organization.objects.all())

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


class ItsOrganization:
    """The default of a project's read-only organization: the one it is in."""

    requires_context = True

    def __call__(self, field: Any) -> Any:
        return getattr(field.parent.instance, "organization", None)


class ProjectUpdateSerializer(ProjectSerializer):
    """A project stays in its organization: moving it would hand it to another tenant."""

    # Read-only, and with a default: DRF drops the unique (organization, name) check of a
    # serializer lacking one of its fields, and a rename to a taken name reached the
    # constraint (an IntegrityError, a 500). On a PATCH the check takes it from the project.
    organization = serializers.PrimaryKeyRelatedField[Organization](  # type: ignore[assignment]
        read_only=True, default=ItsOrganization()
    )


class ItemSerializer(serializers.ModelSerializer):
    class Meta:
        model = Item
        fields = ["id", "project", "title", "done", "position", "version", "updated_at"]
        read_only_fields = ["version", "updated_at"]


class ItemWriteSerializer(ItemSerializer):
    class Meta(ItemSerializer.Meta):
        read_only_fields = ["project", "version", "updated_at"]
