from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User

from board.membership import MEMBER_PERMS
from board.models import Item, Organization, Project


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    password = factory.django.Password("pw")


class OrganizationFactory(factory.django.DjangoModelFactory[Organization]):
    class Meta:
        model = Organization

    name = factory.Sequence(lambda n: f"Org {n}")


class ProjectFactory(factory.django.DjangoModelFactory[Project]):
    class Meta:
        model = Project
        skip_postgeneration_save = True

    organization = factory.SubFactory(OrganizationFactory)
    name = factory.Sequence(lambda n: f"Project {n}")
    owner = factory.SubFactory(UserFactory)

    @factory.post_generation
    def owner_perms(self, create: bool, extracted: object, **kwargs: object) -> None:
        if create:
            from guardian.shortcuts import assign_perm

            for perm in MEMBER_PERMS:
                assign_perm(perm, self.owner, self)  # type: ignore[arg-type]


class ItemFactory(factory.django.DjangoModelFactory[Item]):
    class Meta:
        model = Item

    project = factory.SubFactory(ProjectFactory)
    title = factory.Sequence(lambda n: f"Item {n}")
    position = factory.Sequence(lambda n: n)


def server_password(user: User, raw: str) -> None:
    """Give `user` a password a daphne child of the tests can check (its settings hash with
    PBKDF2; the test process's own default is a fast hasher, tests/settings_test.py)."""
    from django.contrib.auth.hashers import make_password

    user.password = make_password(raw, hasher="pbkdf2_sha256")
