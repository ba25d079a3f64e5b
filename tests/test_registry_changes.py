"""Which changes become events: proxy models, moves, `update_fields`, rollbacks and retries."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

import realtime
from board.models import Item
from realtime.models import Event
from realtime.registry import registry
from realtime.testing import flush

from .factories import ItemFactory, ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)


class ArchivedItem(Item):
    """A proxy of a registered model: its rows are items, and so are its changes."""

    class Meta:
        proxy = True
        app_label = "board"


class Boom(Exception):
    pass


def types(stream: str) -> list[str]:
    rows = Event.objects.filter(stream__name=stream).order_by("seq")
    return list(rows.values_list("type", flat=True))


def save_then_fail(item: Item) -> None:
    """Save in a transaction (or savepoint) that then rolls back."""
    with transaction.atomic():
        item.save()
        raise Boom


def test_a_proxy_saves_and_deletes_as_its_concrete_model():
    project = ProjectFactory()
    stream = f"project:{project.pk}"
    archived = ArchivedItem.objects.create(project=project, title="old")
    archived.title = "older"
    archived.save()
    ArchivedItem.objects.get(pk=archived.pk).delete()
    flush()
    assert types(stream)[1:] == ["v1:item.created", "v1:item.updated", "v1:item.deleted"]
    assert not Event.objects.filter(published_at__isnull=True).exists()


def test_a_proxy_move_is_detected_like_its_concrete_models():
    item = ItemFactory()
    other = ProjectFactory(organization=item.project.organization)
    archived = ArchivedItem.objects.get(pk=item.pk)
    archived.project = other
    archived.save()
    flush()
    assert types(f"project:{item.project_id}")[-1] == "v1:item.deleted"
    assert types(f"project:{other.pk}")[-1] == "v1:item.created"


def test_a_proxy_defined_after_registration_is_covered_too():
    project = ProjectFactory()

    class PinnedItem(Item):
        class Meta:
            proxy = True
            app_label = "board"

    PinnedItem.objects.create(project=project, title="late")
    flush()
    assert types(f"project:{project.pk}")[-1] == "v1:item.created"


def test_a_registered_proxy_adds_its_own_events_to_its_concrete_models():
    realtime.register(ArchivedItem, streams="archive:{project_id}", name="archived")
    try:
        project = ProjectFactory()
        ArchivedItem.objects.create(project=project, title="a")
        Item.objects.create(project=project, title="b")  # not an archived item: not there
        flush()
        assert types(f"project:{project.pk}")[1:] == ["v1:item.created", "v1:item.created"]
        assert types(f"archive:{project.pk}") == ["v1:archived.created"]
    finally:
        registry.unregister(ArchivedItem)
    # Unregistering the proxy leaves it covered by its concrete model's registration.
    ArchivedItem.objects.create(project=project, title="c")
    flush()
    assert types(f"archive:{project.pk}") == ["v1:archived.created"]
    assert types(f"project:{project.pk}")[-1] == "v1:item.created"


def test_a_registered_proxy_on_its_concrete_models_stream_gets_an_event_of_its_own():
    """Two registrations of one stream: the concrete model's and the proxy's own name, in the
    same version. Each is its own event, not one swallowed by the other's."""
    realtime.register(ArchivedItem, streams="project:{project_id}", name="archived")
    try:
        project = ProjectFactory()
        archived = ArchivedItem.objects.create(project=project, title="a")
        archived.delete()
        flush()
        assert types(f"project:{project.pk}")[1:] == [
            "v1:item.created",
            "v1:archived.created",
            "v1:item.deleted",
            "v1:archived.deleted",
        ]
    finally:
        registry.unregister(ArchivedItem)


# -- moves ---------------------------------------------------------------------------------


def test_a_move_retried_after_a_rollback_is_still_a_move():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.get(pk=item.pk)
    item.project = new
    with pytest.raises(Boom):
        save_then_fail(item)  # the move did not happen
    item.save()  # the caller tries again with the same instance
    flush()
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}")[1:] == ["v1:item.created"]


def test_a_move_retried_after_a_savepoint_rollback_is_still_a_move():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.get(pk=item.pk)
    item.project = new
    with transaction.atomic():
        with pytest.raises(Boom):
            save_then_fail(item)  # a savepoint
        item.save()
    flush()
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}")[1:] == ["v1:item.created"]


def test_two_saves_of_one_move_in_one_transaction_move_once():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.get(pk=item.pk)
    with transaction.atomic():
        item.project = new
        item.save()
        item.title = "moved and renamed"
        item.save()
    flush()
    assert types(f"project:{old.pk}")[1:] == ["v1:item.created", "v1:item.deleted"]
    assert types(f"project:{new.pk}")[1:] == ["v1:item.created", "v1:item.updated"]


def moved_by_someone_else() -> tuple[Any, Any, Any, Item]:
    """Projects p1, p2, p3, and an instance of an item loaded on p1 that another instance then
    moved to p2 (deleted on p1, created on p2)."""
    p1: Any = ProjectFactory()
    others: list[Any] = [ProjectFactory(organization=p1.organization) for _ in range(2)]
    p2, p3 = others
    item: Any = ItemFactory(project=p1)
    mine, other = Item.objects.get(pk=item.pk), Item.objects.get(pk=item.pk)
    other.project = p2
    other.save()
    return p1, p2, p3, mine


def test_a_move_after_refresh_from_db_leaves_the_stream_the_row_was_refreshed_in():
    p1, p2, p3, mine = moved_by_someone_else()
    mine.refresh_from_db()
    mine.project = p3
    mine.save()  # from p2, as the refresh read
    flush()
    assert types(f"project:{p1.pk}")[1:] == ["v1:item.created", "v1:item.deleted"]
    assert types(f"project:{p2.pk}")[1:] == ["v1:item.created", "v1:item.deleted"]
    assert types(f"project:{p3.pk}")[1:] == ["v1:item.created"]


def test_a_refresh_of_some_fields_keeps_what_it_did_not_read():
    p1, p2, p3, mine = moved_by_someone_else()
    mine.refresh_from_db(fields=["title"])  # the project is not read: still p1 as far as known
    assert mine.project_id == p1.pk
    mine.refresh_from_db(None, ["project"], Item.objects.all())  # by name; positionally
    mine.project = p3
    mine.save()
    flush()
    assert types(f"project:{p2.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{p1.pk}").count("v1:item.deleted") == 1


def test_a_refresh_in_a_rolled_back_transaction_is_forgotten_with_it():
    p1 = ProjectFactory()
    p2 = ProjectFactory(organization=p1.organization)
    item = Item.objects.get(pk=ItemFactory(project=p1).pk)

    def refresh_then_fail() -> None:
        with transaction.atomic():
            Item.objects.filter(pk=item.pk).update(project=p2)  # undone below
            item.refresh_from_db()
            assert item.project_id == p2.pk
            raise Boom

    with pytest.raises(Boom):
        refresh_then_fail()
    item.refresh_from_db()  # back on p1
    item.title = "renamed"
    item.save()
    flush()
    assert types(f"project:{p1.pk}")[-1] == "v1:item.updated"
    assert types(f"project:{p2.pk}")[1:] == []


def test_a_move_of_a_bulk_created_instance_is_seen():
    p1 = ProjectFactory()
    p2 = ProjectFactory(organization=p1.organization)
    with transaction.atomic():
        [item] = Item.objects.bulk_create([Item(project=p1, title="bulk")])
        assert realtime.emit_instances([item], "created") == 1
    item.project = p2
    item.save()
    flush()
    assert types(f"project:{p1.pk}")[1:] == ["v1:item.created", "v1:item.deleted"]
    assert types(f"project:{p2.pk}")[1:] == ["v1:item.created"]


def test_update_fields_that_leave_the_stream_field_out_move_nothing():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.get(pk=item.pk)
    item.project = new  # changed in memory, not saved
    item.title = "renamed"
    item.save(update_fields=["title"])
    flush()
    assert Item.objects.get(pk=item.pk).project_id == old.pk
    last = Event.objects.filter(stream__name=f"project:{old.pk}").latest("seq")
    assert last.type == "v1:item.updated"
    assert last.data["title"] == "renamed"
    assert last.data["project"] == old.pk  # the row's, not the unsaved value
    assert types(f"project:{new.pk}") == ["v1:project.created"]
    # Saving the stream field later is the move, seen against what the row still holds.
    item.save(update_fields=["project"])
    flush()
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}")[-1] == "v1:item.created"


def test_a_delete_goes_to_the_stream_the_row_is_in():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.get(pk=item.pk)
    item.project = new  # changed in memory, never saved
    item.delete()
    flush()
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}") == ["v1:project.created"]


def test_a_move_of_an_instance_loaded_without_its_stream_field_is_seen():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.only("title").get(pk=item.pk)  # project_id deferred
    item.project_id = new.pk
    item.save()  # Django writes the loaded fields and project_id
    flush()
    assert Item.objects.get(pk=item.pk).project_id == new.pk
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}")[-1] == "v1:item.created"


def test_a_move_after_a_rolled_back_savepoint_leaves_the_stream_the_row_is_in():
    item = ItemFactory()
    org = item.project.organization
    b, c, d = (ProjectFactory(organization=org) for _ in range(3))
    item = Item.objects.get(pk=item.pk)
    with transaction.atomic():
        item.project = b
        item.save()  # stands
        item.project = c
        with pytest.raises(Boom):
            save_then_fail(item)  # a savepoint: undone
        item.project = d
        item.save()  # from b, where the row is
    flush()
    assert Item.objects.get(pk=item.pk).project_id == d.pk
    assert types(f"project:{b.pk}")[1:] == ["v1:item.created", "v1:item.deleted"]
    assert types(f"project:{c.pk}") == ["v1:project.created"]
    assert types(f"project:{d.pk}")[1:] == ["v1:item.created"]


def test_a_delete_of_an_instance_loaded_without_its_stream_field_goes_to_the_rows_stream():
    item = ItemFactory()
    old, new = item.project, ProjectFactory(organization=item.project.organization)
    item = Item.objects.defer("project").get(pk=item.pk)
    item.project_id = new.pk  # never saved
    item.delete()
    flush()
    assert types(f"project:{old.pk}")[-1] == "v1:item.deleted"
    assert types(f"project:{new.pk}") == ["v1:project.created"]


@pytest.mark.parametrize("loaded", [("title",), ("id",)])
def test_a_delete_of_an_instance_loaded_with_deferred_fields_logs_the_rows_values(loaded):
    item = ItemFactory()
    item.save()  # version 2
    stored = Item.objects.get(pk=item.pk)
    item = Item.objects.only(*loaded).get(pk=item.pk)  # version (and project_id) deferred
    item.delete()
    flush()
    assert not Item.objects.filter(pk=stored.pk).exists()
    row = Event.objects.filter(stream__name=f"project:{stored.project_id}").order_by("seq").last()
    assert row.type == "v1:item.deleted"
    assert row.data == {"id": stored.pk, "version": stored.version}


def test_a_stream_kind_can_have_its_own_serializer():
    """`stream_serializers`: the streams of one kind get another payload (a redacted one)."""
    realtime.register(
        ArchivedItem,
        streams=["project:{project_id}", "tenant:{project.organization_id}"],
        serializer=lambda item: {"id": item.pk, "title": item.title},
        stream_serializers={"tenant": lambda item: {"id": item.pk}},
        version="v7",
        name="item",
    )
    try:
        project = ProjectFactory()
        item = ArchivedItem.objects.create(project=project, title="secret")
        item.title = "still secret"
        item.save()
        realtime.emit_instances([item], "updated")
        flush()

        def data(stream: str) -> list:  # of the v7 frames (the project stream's are variants)
            rows = Event.objects.filter(stream__name=stream, type__contains=":item.")
            return [
                e.data if e.type.startswith("v7:") else e.variants["v7"]["data"]
                for e in rows.order_by("seq")
            ]

        tenant = f"tenant:{project.organization_id}"
        assert data(tenant) == [{"id": item.pk}] * 3
        assert data(f"project:{project.pk}") == [
            {"id": item.pk, "title": "secret"},
            {"id": item.pk, "title": "still secret"},
            {"id": item.pk, "title": "still secret"},
        ]
    finally:
        registry.unregister(ArchivedItem)
