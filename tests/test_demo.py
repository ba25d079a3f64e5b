"""The demo data that `make run` creates."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from board.models import Project


@pytest.mark.django_db
def test_demo_seed_is_idempotent_and_sets_object_permissions(capsys):
    call_command("board_demo")
    call_command("board_demo")
    out = capsys.readouterr().out
    assert "alice" in out
    assert "bob-demo-pw" in out
    assert "carol" in out
    launch = Project.objects.get(name="Launch")
    assert Project.objects.count() == 2
    assert launch.items.count() == 3
    from django.contrib.auth import get_user_model

    users = {u.username: u for u in get_user_model().objects.all()}
    assert users["alice"].check_password("alice-demo-pw")
    assert users["alice"].has_perm("board.view_project", launch)
    assert users["alice"].has_perm("board.change_project", launch)
    assert users["bob"].has_perm("board.view_project", launch)
    assert not users["carol"].has_perm("board.view_project", launch)
    assert users["carol"].has_perm("board.view_project", Project.objects.get(name="Research"))
    assert set(launch.organization.members.values_list("username", flat=True)) == {"alice", "bob"}


@pytest.mark.django_db
def test_home_page_lists_what_the_user_may_see(client):
    call_command("board_demo")
    response = client.get("/")
    assert b"alice-demo-pw" in response.content
    client.login(username="carol", password="carol-demo-pw")
    response = client.get("/")
    assert b"Research" in response.content
    assert b"Launch" not in response.content
