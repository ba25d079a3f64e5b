"""Deciding many streams at once (SSE, the event feed): the same answers as one by one, in a
few queries instead of three per stream."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection, models
from django.test.utils import CaptureQueriesContext
from guardian.shortcuts import assign_perm

from board.membership import add_member, grant_owner
from realtime.feed import authorize
from realtime.policies import ObjectPolicy, reload_user, stream_access, stream_kinds, streams_access

from .factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def registered():
    """register(kind, policy) for this test only."""
    kinds = []

    def register(kind: str, policy) -> None:
        stream_kinds.register(kind, policy)
        kinds.append(kind)

    yield register
    for kind in kinds:
        stream_kinds.unregister(kind)


class UserByName(ObjectPolicy):
    """`member:<username>`, by a unique field other than the pk."""

    model = get_user_model()
    permission = "auth.view_user"
    lookup_field = "username"


def one_by_one(user, streams):
    return {stream: stream_access(user, stream) for stream in streams}


def test_twenty_project_streams_take_three_queries_with_the_answers_of_one_by_one():
    reader = UserFactory()
    projects = [ProjectFactory() for _ in range(20)]
    for project in projects[:15]:
        add_member(project, reader)
    streams = [f"project:{p.pk}" for p in projects]
    reader = reload_user(reader)
    with CaptureQueriesContext(connection) as queries:
        audiences = authorize(reader, streams[:15])
    # The projects, then guardian's user and group permissions on all of them.
    assert len(queries.captured_queries) == 3, [q["sql"][:80] for q in queries]
    assert audiences == {stream: "" for stream in streams[:15]}
    assert streams_access(reader, streams) == one_by_one(reader, streams)


@pytest.mark.parametrize("who", ["reader", "superuser", "inactive", "anonymous"])
def test_every_kind_of_answer_is_the_same_together_as_one_by_one(registered, who, caplog):
    from django.contrib.auth.models import AnonymousUser

    registered("member", UserByName)
    reader = UserFactory(is_superuser=who == "superuser", is_active=who != "inactive")
    owned = ProjectFactory(owner=reader)  # the owner audience
    grant_owner(owned, reader)
    member_of = ProjectFactory()
    add_member(member_of, reader)
    by_group = ProjectFactory()
    team = Group.objects.create(name="team")
    reader.groups.add(team)
    assign_perm("board.view_project", team, by_group)
    other = ProjectFactory()  # not the reader's
    seen, unseen = UserFactory(username="seen-user"), UserFactory(username="unseen-user")
    assign_perm("auth.view_user", reader, seen)
    streams = [
        f"project:{owned.pk}",
        f"project:{member_of.pk}",
        f"project:{by_group.pk}",
        f"project:{other.pk}",
        "project:999999",  # no such project: refused as a forbidden one is
        f"project:0{member_of.pk}",  # the same row by another spelling
        "project:abc",  # no integer
        "project:99999999999999999999",  # beyond the column
        f"member:{seen.username}",
        f"member:{unseen.username}",
        "member:nobody",
        f"user:{reader.pk}",
        "planet:1",  # no such kind
    ]
    user = AnonymousUser() if who == "anonymous" else reload_user(reader)
    with caplog.at_level(logging.WARNING, logger="realtime.policies"):
        together = streams_access(user, streams)
    assert caplog.records == []  # decided together: no key made the batch fail
    assert together == one_by_one(user, streams)
    allowed = {s for s, (code, _a) in together.items() if code is None}
    if who == "reader":
        assert allowed == {streams[0], streams[1], streams[2], streams[5], streams[8], streams[11]}
        assert together[streams[0]] == (None, "owner")
        assert together[streams[1]] == (None, "")
    elif who == "superuser":
        assert together[streams[3]] == (None, "owner")  # every permission, on every project
    else:
        assert allowed == set()


def test_a_policy_that_decides_its_own_way_is_asked_key_by_key(registered):
    asked = []

    class Picky(ObjectPolicy):
        model = get_user_model()
        permission = "auth.view_user"

        def authorize(self, user, key):
            asked.append(key)
            return key == str(user.pk)

    registered("picky", Picky)
    reader = UserFactory()
    streams = [f"picky:{reader.pk}", "picky:424242"]
    assert streams_access(reader, streams) == {
        streams[0]: (None, ""),
        streams[1]: ("forbidden", None),
    }
    assert asked == [str(reader.pk), "424242"]


def test_a_batch_that_raises_is_decided_again_one_by_one_refusing_only_the_raising_stream(
    registered, caplog
):
    class Fragile(ObjectPolicy):
        model = get_user_model()
        permission = "auth.view_user"

    class Breaks:
        def has_stream_permission(self, user, kind, key):
            if key == "13":
                raise RuntimeError("policy bug")
            return True

    Fragile.permission_classes = [Breaks]
    registered("fragile", Fragile)
    reader = UserFactory()
    seen = UserFactory()
    assign_perm("auth.view_user", reader, seen)
    streams = [f"fragile:{seen.pk}", "fragile:13"]
    with caplog.at_level(logging.WARNING, logger="realtime.policies"):
        decided = streams_access(reader, streams)
    assert decided == {streams[0]: (None, ""), streams[1]: ("forbidden", None)}
    assert "one by one" in caplog.text
    assert "policy for fragile:13 raised" in caplog.text


class ProjectsWithMembers(models.Manager):
    """A default manager that joins: one row per active member."""

    def get_queryset(self):
        return super().get_queryset().filter(members__is_active=True)


def test_a_key_the_query_places_on_several_rows_is_decided_alone(monkeypatch):
    from board.models import Project

    manager = ProjectsWithMembers()
    manager.model = Project
    manager.name = "with_members"
    monkeypatch.setitem(Project._meta.__dict__, "default_manager", manager)
    reader, other = UserFactory(), UserFactory()
    projects = [ProjectFactory(), ProjectFactory()]
    for project in projects:
        add_member(project, reader)
        add_member(project, other)  # two members: two rows of each project
    reader = reload_user(reader)
    streams = [f"project:{p.pk}" for p in projects]
    together = streams_access(reader, streams)
    # One by one, `get()` finds two rows: refused (and logged), and so is it together.
    assert together == one_by_one(reader, streams)
    assert together == {stream: ("forbidden", None) for stream in streams}


def test_a_key_the_query_places_on_no_row_is_decided_alone(registered, monkeypatch):
    # Missing, or matched by the database's rules and not Python's (a case-insensitive
    # collation: `Alpha` finds the row `alpha`, which the batch cannot tell is Alpha's): the
    # batch asks `access` for that key, as one by one does.
    registered("member", UserByName)
    reader = UserFactory()
    seen = UserFactory(username="seen-user")
    assign_perm("auth.view_user", reader, seen)
    reader = reload_user(reader)
    alone: list[str] = []
    original = ObjectPolicy.access

    def access(self, user, kind, key):
        alone.append(key)
        return original(self, user, kind, key)

    monkeypatch.setattr(ObjectPolicy, "access", access)
    monkeypatch.setattr(
        UserByName, "_batch_field", lambda self: UserByName.model._meta.get_field("username")
    )
    streams = ["member:seen-user", "member:nobody"]
    assert streams_access(reader, streams) == {
        "member:seen-user": (None, ""),
        "member:nobody": ("forbidden", None),
    }
    assert alone == ["nobody"]


@pytest.mark.parametrize("who", ["inactive", "anonymous"])
def test_without_permission_classes_the_checker_decides_for_inactive_and_anonymous(registered, who):
    from django.contrib.auth.models import AnonymousUser

    class Open(ObjectPolicy):
        permission_classes = []  # guardian alone decides
        model = get_user_model()
        permission = "auth.view_user"

    registered("open", Open)
    reader = UserFactory(is_active=who != "inactive")
    targets = [UserFactory(), UserFactory()]
    for target in targets:
        assign_perm("auth.view_user", reader, target)
    user = AnonymousUser() if who == "anonymous" else reload_user(reader)
    streams = [f"open:{t.pk}" for t in targets]
    together = streams_access(user, streams)
    assert together == one_by_one(user, streams)
    assert together == {stream: ("forbidden", None) for stream in streams}


def test_a_policy_that_does_not_import_refuses_its_streams_only(settings, caplog):
    settings.REALTIME = {"STREAM_POLICIES": {"broken": "board.nope.Policy"}}
    reader = UserFactory()
    decided = streams_access(reader, ["broken:1", f"user:{reader.pk}"])
    assert decided == {"broken:1": ("forbidden", None), f"user:{reader.pk}": (None, "")}
    assert "policy for broken:1 raised" in caplog.text


def test_the_demos_tenant_kind_refuses_a_key_beyond_the_column_without_an_error(caplog):
    """`tenant:<99999999999999999999>` names no organization: refused as a missing one is,
    not by a policy that raised (SQLite's OverflowError, logged with a traceback for every
    request that sends it)."""
    from board.models import Organization

    reader = UserFactory()
    mine = Organization.objects.create(name="Mine")
    mine.members.add(reader)
    streams = [f"tenant:{mine.pk}", "tenant:99999999999999999999", "tenant:٣", "tenant:-1"]
    with caplog.at_level(logging.WARNING):
        together = streams_access(reader, streams)
        alone = one_by_one(reader, streams)
    assert [r.getMessage() for r in caplog.records] == []
    assert together == alone
    assert {s for s, (code, _a) in together.items() if code is None} == {streams[0]}
