"""Which permission changes tell which users' sockets to decide again, and how many messages."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connection, models, transaction
from django.db.models import signals
from django.test.utils import CaptureQueriesContext, isolate_apps
from guardian.models import GroupObjectPermission, UserObjectPermission
from guardian.shortcuts import assign_perm, remove_perm

from board.models import Project
from realtime import invalidation
from realtime.consumers import user_group
from realtime.testing import flush, record_group_sends

from .factories import ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


def authz_sent(sent: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The users told to decide again, one entry per message, in order."""
    return [m["user"] for _group, m in sent if m["type"] == "realtime.authz"]


def projects(count: int) -> list[Project]:
    return ProjectFactory.create_batch(count)


def test_a_revoke_of_many_rows_in_one_transaction_sends_one_message_per_user():
    reader, other = UserFactory(), UserFactory()
    listed = projects(30)
    for project in listed:
        assign_perm("board.view_project", reader, project)
        assign_perm("board.view_project", other, project)
    flush()
    with record_group_sends() as sent:
        with transaction.atomic():
            # QuerySet.delete sends pre/post_delete per row: 60 signals, 60 commit hooks.
            UserObjectPermission.objects.filter(user__in=[reader, other]).delete()
            flush()
            assert authz_sent(sent) == []  # nothing before the commit
        flush()
    assert sorted(authz_sent(sent)) == sorted([reader.pk, other.pk])
    assert {group for group, _m in sent} == {user_group(reader.pk), user_group(other.pk)}


def test_guardians_bulk_remove_perm_sends_one_message():
    reader = UserFactory()
    listed = projects(20)
    assign_perm("board.view_project", reader, Project.objects.filter(pk__in=[p.pk for p in listed]))
    flush()
    with record_group_sends() as sent:
        with transaction.atomic():
            remove_perm("board.view_project", reader, Project.objects.all())
        flush()
    assert authz_sent(sent) == [reader.pk]


def test_a_group_revoke_reads_its_members_once_and_tells_each_member_once():
    group = Group.objects.create(name="readers")
    members = [UserFactory() for _ in range(3)]
    group.user_set.add(*members)
    for project in projects(25):
        assign_perm("board.view_project", group, project)
    flush()
    with record_group_sends() as sent, CaptureQueriesContext(connection) as queries:
        with transaction.atomic():
            GroupObjectPermission.objects.filter(group=group).delete()
        flush()
    assert sorted(authz_sent(sent)) == sorted(m.pk for m in members)
    member_reads = [q["sql"] for q in queries if '"auth_user_groups"' in q["sql"]]
    assert len(member_reads) == 1, member_reads


def test_a_change_in_a_rolled_back_savepoint_still_leaves_the_committed_ones_told():
    reader, kept = UserFactory(), UserFactory()
    project = ProjectFactory()
    assign_perm("board.view_project", reader, project)
    assign_perm("board.view_project", kept, project)
    flush()
    with record_group_sends() as sent:
        with transaction.atomic():
            try:
                with transaction.atomic():
                    remove_perm("board.view_project", reader, project)
                    raise RuntimeError("undo")
            except RuntimeError:
                pass
            remove_perm("board.view_project", kept, project)
        flush()
    # The committed revoke is told. The undone one may be told too (a decision made again
    # for nothing, which finds the permission still there); it is never a missed one.
    assert kept.pk in authz_sent(sent)
    assert UserObjectPermission.objects.filter(user=reader).exists()


def test_separate_transactions_each_send_their_own_message():
    reader = UserFactory()
    first, second = projects(2)
    assign_perm("board.view_project", reader, first)
    assign_perm("board.view_project", reader, second)
    flush()
    with record_group_sends() as sent:
        remove_perm("board.view_project", reader, first)
        flush()
        assert authz_sent(sent) == [reader.pk]
        remove_perm("board.view_project", reader, second)
        flush()
    assert authz_sent(sent) == [reader.pk, reader.pk]


def test_a_commit_hook_that_fails_is_logged_and_the_next_commit_still_tells(monkeypatch, caplog):
    reader = UserFactory()
    first, second = projects(2)
    assign_perm("board.view_project", reader, first)
    assign_perm("board.view_project", reader, second)
    flush()
    real = invalidation._send
    calls = []

    def broken(user_ids, message_type):
        calls.append(set(user_ids))
        raise RuntimeError("layer gone")

    monkeypatch.setattr(invalidation, "_send", broken)
    remove_perm("board.view_project", reader, first)  # the hook raises: logged, not raised
    assert calls == [{reader.pk}]
    assert "layer gone" in caplog.text
    monkeypatch.setattr(invalidation, "_send", real)
    with record_group_sends() as sent:
        remove_perm("board.view_project", reader, second)
        flush()
    assert authz_sent(sent) == [reader.pk]


@isolate_apps("board")
def test_direct_foreign_key_permission_models_are_watched_too():
    from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

    class Document(models.Model):
        class Meta:
            app_label = "board"

        def __str__(self) -> str:
            return f"document {self.pk}"

    class DocumentUserObjectPermission(UserObjectPermissionBase):
        content_object = models.ForeignKey(Document, on_delete=models.CASCADE)

        class Meta:
            app_label = "board"

    class DocumentGroupObjectPermission(GroupObjectPermissionBase):
        content_object = models.ForeignKey(Document, on_delete=models.CASCADE)

        class Meta:
            app_label = "board"

    found = dict(invalidation.permission_models(registry=Document._meta.apps))
    assert found == {DocumentUserObjectPermission: "user", DocumentGroupObjectPermission: "group"}

    invalidation.connect(registry=Document._meta.apps)
    try:
        reader = UserFactory()
        group = Group.objects.create(name="doc-readers")
        member = UserFactory()
        group.user_set.add(member)
        flush()
        with record_group_sends() as sent:
            row = DocumentUserObjectPermission(user_id=reader.pk)
            signals.post_delete.send(DocumentUserObjectPermission, instance=row, using="default")
            grow = DocumentGroupObjectPermission(group_id=group.pk)
            signals.post_save.send(
                DocumentGroupObjectPermission, instance=grow, created=True, using="default"
            )
            flush()
        assert sorted(authz_sent(sent)) == sorted([reader.pk, member.pk])
    finally:
        for model in (DocumentUserObjectPermission, DocumentGroupObjectPermission):
            label = model._meta.label_lower
            for signal in (signals.post_save, signals.post_delete, signals.pre_delete):
                signal.disconnect(sender=model, dispatch_uid=f"rt.uop.{label}")
                signal.disconnect(sender=model, dispatch_uid=f"rt.gop.{label}")


def test_model_wide_permission_changes_tell_the_users_concerned():
    # A policy may read model-wide permissions (user.has_perm("board.view_project")): a
    # grant or revoke of one, from either side, is told like an object permission's.
    from django.contrib.auth.models import Permission

    perm = Permission.objects.get(codename="view_project", content_type__app_label="board")
    alice, bob, carol = UserFactory(), UserFactory(), UserFactory()
    team = Group.objects.create(name="readers")
    team.user_set.add(bob, carol)
    flush()
    cases = [
        (lambda: alice.user_permissions.add(perm), [alice.pk]),
        (lambda: alice.user_permissions.remove(perm), [alice.pk]),
        (lambda: perm.user_set.add(bob, carol), [bob.pk, carol.pk]),
        (lambda: perm.user_set.clear(), [bob.pk, carol.pk]),
        (lambda: team.permissions.add(perm), [bob.pk, carol.pk]),
        (lambda: team.permissions.clear(), [bob.pk, carol.pk]),
        (lambda: perm.group_set.add(team), [bob.pk, carol.pk]),
        (lambda: perm.group_set.remove(team), [bob.pk, carol.pk]),
    ]
    for change, told in cases:
        with record_group_sends() as sent:
            change()
            flush()
        assert sorted(authz_sent(sent)) == sorted(told)


def test_a_permission_row_moved_to_another_user_or_group_tells_who_lost_it_too():
    alice, bob, carol = UserFactory(), UserFactory(), UserFactory()
    readers, others = Group.objects.create(name="readers"), Group.objects.create(name="others")
    readers.user_set.add(carol)
    project = ProjectFactory()
    assign_perm("board.view_project", alice, project)
    assign_perm("board.view_project", readers, project)
    flush()
    row = UserObjectPermission.objects.get(user=alice, object_pk=str(project.pk))
    with record_group_sends() as sent:
        row.user = bob  # alice loses board.view_project on the project
        row.save()
        flush()
    assert sorted(authz_sent(sent)) == sorted([alice.pk, bob.pk])
    grant = GroupObjectPermission.objects.get(group=readers, object_pk=str(project.pk))
    others.user_set.add(bob)
    flush()
    with record_group_sends() as sent:
        grant.group = others
        grant.save()
        flush()
    assert sorted(authz_sent(sent)) == sorted([carol.pk, bob.pk])


def test_a_logout_inside_a_transaction_is_told_after_it_commits():
    from django.contrib.auth import user_logged_out

    bob = UserFactory()
    with record_group_sends() as sent:
        with transaction.atomic():  # ATOMIC_REQUESTS: the session flush commits at the end
            user_logged_out.send(sender=type(bob), request=None, user=bob)
            flush()
            assert [m["type"] for _g, m in sent] == []  # a reconnect now would still get in
        flush()
    assert [m["type"] for _g, m in sent] == ["realtime.logout"]


def test_control_messages_carry_a_user_id_that_is_not_an_integer_as_text():
    """channels-redis packs messages with msgpack, which refuses a UUID: a user model whose
    pk is one must still reach its sockets (decisions, logouts, disconnects)."""
    import uuid

    import msgpack

    pk = uuid.UUID("12345678-1234-5678-1234-567812345678")
    with record_group_sends() as sent:
        invalidation.permissions_changed([pk, 7])
        flush()
        invalidation.disconnect([(pk, "c1")])
        flush()
    messages = {(m["type"], m["user"]) for _group, m in sent}
    assert messages == {
        ("realtime.authz", str(pk)),
        ("realtime.authz", 7),  # an int stays one: a node of the last release matches it
        ("realtime.disconnect", str(pk)),
    }
    for _group, message in sent:
        msgpack.packb(message)  # what channels-redis does; raised TypeError for the UUID
    assert user_group(pk) in {group for group, _m in sent}
