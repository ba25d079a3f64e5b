"""Demo data for `make run`: alice owns "Launch", bob is a member, carol is elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from .membership import add_member, create_project
from .models import Item, Organization, Project


@dataclass(frozen=True)
class DemoUser:
    username: str
    password: str
    note: str


DEMO_USERS = (
    DemoUser("alice", "alice-demo-pw", 'owner of "Launch" (Acme), staff: can open /admin/'),
    DemoUser("bob", "bob-demo-pw", 'member of "Launch" (Acme)'),
    DemoUser("carol", "carol-demo-pw", 'in Globex, owner of "Research"; no access to "Launch"'),
)


@transaction.atomic
def seed() -> list[DemoUser]:
    """Create the demo users, organizations, projects and items; safe to run again."""
    User = get_user_model()
    users = {}
    for demo in DEMO_USERS:
        user, created = User.objects.get_or_create(username=demo.username)
        if created:
            user.set_password(demo.password)
            user.email = f"{demo.username}@example.com"
            user.is_staff = user.is_superuser = demo.username == "alice"
            user.save()
        users[demo.username] = user

    acme, _ = Organization.objects.get_or_create(name="Acme")
    acme.members.add(users["alice"], users["bob"])
    globex, _ = Organization.objects.get_or_create(name="Globex")
    globex.members.add(users["carol"])

    launch = Project.objects.filter(organization=acme, name="Launch").first()
    if launch is None:
        launch = create_project(organization=acme, name="Launch", owner=users["alice"])
        for position, title in enumerate(
            ["Write the press release", "Book the venue", "Ship the beta"]
        ):
            Item.objects.create(project=launch, title=title, position=position)
    add_member(launch, users["bob"])

    if not Project.objects.filter(organization=globex, name="Research").exists():
        research = create_project(organization=globex, name="Research", owner=users["carol"])
        Item.objects.create(project=research, title="Read the papers", position=0)
    return list(DEMO_USERS)
