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


@pytest.mark.django_db
def test_event_log_admin_is_read_only_and_lists_events(admin_client):
    call_command("board_demo")
    response = admin_client.get("/admin/realtime/event/?type=v1:item.created")
    assert response.status_code == 200
    assert b"v1:item.created" in response.content
    assert admin_client.get("/admin/realtime/event/add/").status_code == 403
    assert admin_client.get("/admin/realtime/stream/").status_code == 200


@pytest.mark.django_db
def test_non_staff_demo_users_can_log_in_and_out(client):
    call_command("board_demo")
    response = client.post("/accounts/login/", {"username": "bob", "password": "bob-demo-pw"})
    assert response.status_code == 302
    assert b"Launch" in client.get("/").content
    assert client.post("/accounts/logout/").status_code == 302
    assert b"log in" in client.get("/").content


@pytest.mark.django_db
def test_login_page_lists_the_demo_users_and_pages_need_a_login(client):
    page = client.get("/accounts/login/").content.decode()
    for username, password in [("alice", "alice-demo-pw"), ("bob", "bob-demo-pw")]:
        assert f"<code>{username}</code> / <code>{password}</code>" in page
    call_command("board_demo")
    assert client.get("/projects/1/").status_code == 302  # to the login page
    client.login(username="carol", password="carol-demo-pw")
    launch = Project.objects.get(name="Launch")
    assert client.get(f"/projects/{launch.pk}/").status_code == 404  # hidden like missing
    assert client.get("/dashboard/").status_code == 302  # staff only
    client.login(username="alice", password="alice-demo-pw")
    board = client.get(f"/projects/{launch.pk}/").content.decode()
    assert f'data-project="{launch.pk}"' in board
    assert "board/board.js" in board
    dashboard = client.get("/dashboard/").content.decode()
    assert f"project:{launch.pk}" in dashboard
    assert "v1:item.created" in dashboard
