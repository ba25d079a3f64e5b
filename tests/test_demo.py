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
def test_a_demo_password_changed_since_is_not_printed(capsys):
    from django.contrib.auth import get_user_model

    call_command("board_demo")
    bob = get_user_model().objects.get(username="bob")
    bob.set_password("something-else")
    bob.save()
    capsys.readouterr()
    call_command("board_demo")
    out = capsys.readouterr().out
    assert "alice-demo-pw" in out
    assert "bob-demo-pw" not in out  # it would not log in
    assert "bob" in out
    assert "password changed" in out
    bob.refresh_from_db()
    assert bob.check_password("something-else")  # left as its owner set it


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


@pytest.mark.django_db
def test_the_event_log_and_its_streams_cannot_be_deleted_in_the_admin(admin_client):
    """Deleting an event would leave a hole no resume sees; deleting a stream, a new epoch."""
    from realtime.models import Event, Stream

    call_command("board_demo")
    event = Event.objects.order_by("pk").first()
    stream = Stream.objects.order_by("pk").first()
    assert admin_client.get(f"/admin/realtime/event/{event.pk}/delete/").status_code == 403
    assert admin_client.get(f"/admin/realtime/stream/{stream.pk}/delete/").status_code == 403
    listing = admin_client.get("/admin/realtime/event/").content
    assert b"delete_selected" not in listing
    admin_client.post(
        "/admin/realtime/event/",
        {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"},
    )
    assert Event.objects.filter(pk=event.pk).exists()


@pytest.mark.django_db
def test_project_members_edited_in_the_admin_get_and_lose_access(admin_client):
    from django.contrib.auth import get_user_model

    from board.models import Organization

    User = get_user_model()
    call_command("board_demo")
    bob, carol = User.objects.get(username="bob"), User.objects.get(username="carol")
    globex = Organization.objects.get(name="Globex")
    response = admin_client.post(
        "/admin/board/project/add/",
        {"organization": globex.pk, "name": "Made here", "owner": carol.pk, "members": [bob.pk]},
    )
    assert response.status_code == 302, response.content
    made = Project.objects.get(name="Made here")
    carol, bob = User.objects.get(pk=carol.pk), User.objects.get(pk=bob.pk)  # fresh perm caches
    assert carol.has_perm("board.view_project", made)
    assert carol.has_perm("board.delete_project", made)
    assert bob.has_perm("board.change_project", made)

    research = Project.objects.get(name="Research")
    form = {"organization": globex.pk, "name": "Research", "owner": carol.pk}
    admin_client.post(f"/admin/board/project/{research.pk}/change/", {**form, "members": [bob.pk]})
    assert User.objects.get(pk=bob.pk).has_perm("board.view_project", research)
    response = admin_client.post(f"/admin/board/project/{research.pk}/change/", form)  # bob out
    assert response.status_code == 302, response.content
    assert not User.objects.get(pk=bob.pk).has_perm("board.view_project", research)
    assert User.objects.get(pk=carol.pk).has_perm("board.view_project", research)  # the owner
    # A new owner gets the owner's permissions, and the old one keeps only a member's.
    moved = {**form, "owner": bob.pk, "members": [carol.pk]}
    response = admin_client.post(f"/admin/board/project/{research.pk}/change/", moved)
    assert response.status_code == 302, response.content
    bob, carol = User.objects.get(pk=bob.pk), User.objects.get(pk=carol.pk)
    assert bob.has_perm("board.delete_project", research)
    assert carol.has_perm("board.view_project", research)
    assert not carol.has_perm("board.delete_project", research)


@pytest.mark.django_db
def test_streams_admin_counts_kept_events_without_scanning_the_whole_log(admin_client):
    """The list (and its count) must not join and group every event of every stream."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    import realtime
    from realtime.log import prune
    from realtime.models import Event
    from realtime.testing import flush

    for n in range(12):
        realtime.emit("tenant:kept", "v1:tick.happened", {"n": n})
    realtime.emit("tenant:other", "v1:tick.happened", {})
    flush()
    Event.objects.update(published_at=timezone.now())
    prune(max_events=5)
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/realtime/stream/?q=tenant:kept").content.decode()
    assert "tenant:kept" in page
    assert '<td class="field-retained">5</td>' in page
    for query in queries.captured_queries:
        sql = query["sql"]
        if '"realtime_stream"' in sql:
            assert "GROUP BY" not in sql, sql
            assert 'JOIN "realtime_event"' not in sql, sql
    ordered = admin_client.get("/admin/realtime/stream/?o=2").content.decode()  # "retained"
    assert ordered.index("tenant:other") < ordered.index("tenant:kept")


@pytest.mark.django_db
def test_the_event_log_admin_reads_a_bounded_part_of_the_log(admin_client, monkeypatch):
    """Its type filter's choices and its page count read the newest rows only: a DISTINCT
    or a COUNT(*) over the whole log, at each page, would not finish on a big one."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from realtime.admin import EventAdmin

    monkeypatch.setattr(EventAdmin, "list_per_page", 5)  # the demo's log spans pages
    call_command("board_demo")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get("/admin/realtime/event/")
    assert page.status_code == 200
    assert b"v1:item.created" in page.content  # a choice of the type filter
    on_the_log = [q["sql"] for q in queries if 'FROM "realtime_event"' in q["sql"]]
    assert on_the_log
    for sql in on_the_log:
        assert "LIMIT" in sql.upper(), sql
    filtered = admin_client.get("/admin/realtime/event/?type=v1:item.created")
    assert filtered.status_code == 200
    assert b'class="field-type">v1:item.created<' in filtered.content
    assert b'class="field-type">v1:project.created<' not in filtered.content
