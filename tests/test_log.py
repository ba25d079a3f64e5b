"""The durable pipeline: log in the writer's transaction, publish after commit, relay."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db import transaction

import realtime
from board.models import Item, Project
from realtime.models import Event, Stream
from realtime.publisher import publisher
from realtime.registry import RegistrationError
from realtime.streams import InvalidStreamName, group_name
from realtime.testing import flush, receive_published, record_group_sends

from .factories import ItemFactory, OrganizationFactory, ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


def create_then_fail(project: Project, title: str) -> None:
    """Create an item in a transaction (or savepoint) that then rolls back."""
    with transaction.atomic():
        Item.objects.create(project=project, title=title)
        raise Boom


def events(stream: str) -> list[Event]:
    return list(Event.objects.filter(stream__name=stream).order_by("seq"))


def frame(message: dict, version: str = "v1") -> dict:
    return json.loads(message["frames"][version])


def test_committed_save_logs_one_event_and_publishes_only_after_commit():
    project = ProjectFactory()
    stream = f"project:{project.pk}"
    flush()
    seen: dict[str, object] = {}

    def save_in_transaction():
        with record_group_sends() as sent, transaction.atomic():
            before = publisher.submitted
            Item.objects.create(project=project, title="first")
            seen["logged_inside"] = Event.objects.filter(type="v1:item.created").count()
            seen["sent_inside"] = len(sent)
            seen["submitted_inside"] = publisher.submitted - before

    [message] = async_to_sync(receive_published)([stream], save_in_transaction)
    assert seen == {"logged_inside": 1, "sent_inside": 0, "submitted_inside": 0}

    [event] = [e for e in events(stream) if e.type == "v1:item.created"]
    published = frame(message)
    assert message["type"] == "realtime.event"
    assert published["eventId"] == str(event.event_id)
    assert published["seq"] == event.seq == Stream.objects.get(name=stream).last_seq
    assert published["data"]["title"] == "first"
    flush()
    event.refresh_from_db()
    assert event.published_at is not None


def test_rolled_back_transaction_logs_and_publishes_nothing():
    project = ProjectFactory()
    flush()
    logged = Event.objects.count()
    submitted = publisher.submitted
    with record_group_sends() as sent:
        with pytest.raises(Boom):
            create_then_fail(project, "never")
        flush()
    assert Event.objects.count() == logged
    assert publisher.submitted == submitted
    assert sent == []


def test_savepoint_rollback_drops_only_its_own_events():
    project = ProjectFactory()
    stream = f"project:{project.pk}"
    flush()
    base = Stream.objects.get(name=stream).last_seq
    with record_group_sends() as sent:
        with transaction.atomic():
            Item.objects.create(project=project, title="kept 1")
            with pytest.raises(Boom):
                create_then_fail(project, "dropped")
            Item.objects.create(project=project, title="kept 2")
        flush()
    logged = [e for e in events(stream) if e.seq > base]
    assert [e.data["title"] for e in logged] == ["kept 1", "kept 2"]
    assert [e.seq for e in logged] == [base + 1, base + 2]  # no hole where the rollback was
    assert [frame(m)["data"]["title"] for _, m in sent] == ["kept 1", "kept 2"]


def test_autocommit_save_writes_change_and_event_in_one_transaction(monkeypatch):
    project = ProjectFactory()
    flush()
    count = Item.objects.count()
    import realtime.log

    def fail(*args, **kwargs):
        raise Boom

    monkeypatch.setattr(realtime.log, "_insert", fail)
    with pytest.raises(Boom):
        Item.objects.create(project=project, title="orphan")
    # Without an event the change is not kept either: no change is ever missing from the log.
    assert Item.objects.count() == count


def test_update_delete_and_version_field():
    item = ItemFactory()
    stream = f"project:{item.project_id}"
    item.title = "renamed"
    item.save()
    pk = item.pk
    item.delete()
    flush()
    created, updated, deleted = [e for e in events(stream) if e.type.startswith("v1:item.")]
    assert (created.type, updated.type, deleted.type) == (
        "v1:item.created",
        "v1:item.updated",
        "v1:item.deleted",
    )
    assert updated.data["title"] == "renamed"
    assert updated.data["version"] == 2
    assert deleted.data == {"id": pk, "version": 2}
    assert created.seq < updated.seq < deleted.seq


def test_queryset_delete_sends_one_event_per_instance():
    project = ProjectFactory()
    ItemFactory.create_batch(3, project=project)
    ids = set(project.items.values_list("pk", flat=True))
    project.items.all().delete()
    flush()
    deleted = [e for e in events(f"project:{project.pk}") if e.type == "v1:item.deleted"]
    assert {e.data["id"] for e in deleted} == ids


def test_moving_an_item_deletes_from_old_stream_and_creates_in_new():
    item = ItemFactory()
    old_project = item.project
    new_project = ProjectFactory(organization=old_project.organization)
    item = Item.objects.get(pk=item.pk)  # as a view would load it
    item.project = new_project
    item.save()
    flush()
    old_last = events(f"project:{old_project.pk}")[-1]
    new_last = events(f"project:{new_project.pk}")[-1]
    assert old_last.type == "v1:item.deleted"
    assert old_last.data["id"] == item.pk
    assert new_last.type == "v1:item.created"
    assert new_last.data["project"] == new_project.pk
    # Saving again without a move is a plain update on the new stream only.
    item.title = "again"
    item.save()
    flush()
    assert events(f"project:{old_project.pk}")[-1].pk == old_last.pk
    assert events(f"project:{new_project.pk}")[-1].type == "v1:item.updated"


def test_project_events_go_to_project_and_tenant_streams():
    org = OrganizationFactory()
    project = ProjectFactory(organization=org)
    flush()
    assert [e.type for e in events(f"project:{project.pk}")] == ["v1:project.created"]
    assert [e.type for e in events(f"tenant:{org.pk}")] == ["v1:project.created"]
    assert events(f"project:{project.pk}")[0].data["name"] == project.name
    # Every member of the organization reads its stream: it names the project, no more.
    assert events(f"tenant:{org.pk}")[0].data == {"id": project.pk, "organization": org.pk}


def test_emit_logs_and_publishes_in_the_callers_transaction():
    with record_group_sends() as sent:
        with realtime.correlation("job-7"), transaction.atomic():
            envelope = realtime.emit("tenant:acme", "v1:report.ready", {"rows": 3})
            assert sent == []
        flush()
    [event] = events("tenant:acme")
    assert (event.seq, event.type, event.data, event.correlation_id) == (
        envelope.seq,
        "v1:report.ready",
        {"rows": 3},
        "job-7",
    )
    [(group, message)] = sent
    assert group == group_name("tenant:acme") == "rt.tenant.acme"
    assert frame(message)["correlationId"] == "job-7"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("not a stream", "v1:a.b", {}), InvalidStreamName),
        (("tenant:x", "report.ready", {}), ValueError),
        (("tenant:x", "v1:a.b", {"when": object()}), TypeError),
    ],
)
def test_emit_rejects_bad_input_before_logging(args, error):
    with pytest.raises(error):
        realtime.emit(*args)
    assert Event.objects.count() == 0


def test_several_versions_share_one_event_and_seq():
    realtime.register(
        Item,
        streams="project:{project_id}",
        serializer=lambda item: {"id": item.pk, "name": item.title.upper()},
        version="v2",
    )
    try:
        project = ProjectFactory()
        flush()

        def create():
            Item.objects.create(project=project, title="multi")

        [message] = async_to_sync(receive_published)([f"project:{project.pk}"], create)
    finally:
        realtime.registry.registry.unregister(Item, version="v2")
    [event] = [e for e in events(f"project:{project.pk}") if "item" in e.type]
    assert event.type == "v1:item.created"
    assert event.data["title"] == "multi"
    assert event.variants == {
        "v2": {"type": "v2:item.created", "data": {"id": event.data["id"], "name": "MULTI"}}
    }
    v1, v2 = frame(message, "v1"), frame(message, "v2")
    assert (
        (v1["seq"], v1["eventId"]) == (v2["seq"], v2["eventId"]) == (event.seq, str(event.event_id))
    )
    assert v2["type"] == "v2:item.created"
    assert v2["data"]["name"] == "MULTI"


def test_correlation_id_is_carried_by_events():
    project = ProjectFactory()
    with realtime.correlation("abc-123"):
        Item.objects.create(project=project, title="x")
    [event] = [e for e in events(f"project:{project.pk}") if e.type == "v1:item.created"]
    assert event.correlation_id == "abc-123"


def test_the_publisher_does_not_keep_its_first_callers_correlation_id():
    from realtime.context import get_correlation_id
    from realtime.publisher import Outgoing, Publisher

    seen: list[str | None] = []
    own = Publisher()  # a fresh one: its worker task is made by the first submit below

    async def send(items, worker):
        seen.append(get_correlation_id())
        return [], 0

    own.send = send  # type: ignore[method-assign]
    try:
        for correlation_id in ("first", "second", "third"):
            with realtime.correlation(correlation_id):
                own.submit([Outgoing(None, "", 0, "group", {"type": "realtime.authz"})])
            assert own.flush(timeout=5)
    finally:
        loop = own._private_loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
    # A long-lived task logs under no request's id, not the first one's for ever.
    assert seen == [None, None, None]


def test_disabled_pipeline_logs_nothing(settings):
    settings.REALTIME = {"ENABLED": False}
    ProjectFactory()
    assert Event.objects.count() == 0


def test_raw_saves_from_fixtures_log_nothing(tmp_path):
    project = ProjectFactory()
    flush()
    fixture = tmp_path / "items.json"
    fixture.write_text(
        json.dumps(
            [
                {
                    "model": "board.item",
                    "pk": 999,
                    "fields": {
                        "project": project.pk,
                        "title": "fixture",
                        "done": False,
                        "position": 0,
                        "version": 1,
                        "updated_at": "2026-01-01T00:00:00Z",
                    },
                }
            ]
        )
    )
    before = Event.objects.count()
    call_command("loaddata", str(fixture), verbosity=0)
    assert Item.objects.filter(pk=999).exists()
    assert Event.objects.count() == before


def test_invalid_stream_at_save_time_fails_the_save():
    realtime.register(Project, streams=lambda p: "Not A Stream", version="v3")
    try:
        with pytest.raises(RegistrationError, match="invalid stream name"):
            ProjectFactory()
        assert Project.objects.count() == 0
    finally:
        realtime.registry.registry.unregister(Project, version="v3")


# -- publish failure and relay --------------------------------------------------------------


@pytest.fixture
def failing_layer():
    """The channel layer raises on every group_send until the test deletes the override."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()

    async def group_send(group, message):
        raise ConnectionError("layer down")

    layer.group_send = group_send
    yield layer
    layer.__dict__.pop("group_send", None)


def test_failed_publish_leaves_event_for_the_relay_which_publishes_it_once(failing_layer):
    item = ItemFactory()
    flush()
    failing = list(Event.objects.filter(published_at__isnull=True).order_by("stream_id", "seq"))
    assert len(failing) == 3  # project on project: and tenant:, then the item
    del failing_layer.group_send  # the layer is back

    with record_group_sends() as sent:
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
        assert [m["eventId"] for _, m in sent] == [str(e.event_id) for e in failing]
        assert not Event.objects.filter(published_at__isnull=True).exists()
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
    assert len(sent) == 3  # the second pass found nothing
    item_event = Event.objects.get(
        stream__name=f"project:{item.project_id}", type="v1:item.created"
    )
    assert frame(dict(sent)[group_name(f"project:{item.project_id}")])["seq"] in (1, 2)
    assert item_event.published_at is not None


def test_a_hand_off_that_raises_after_commit_is_logged_and_the_relay_has_the_event(
    monkeypatch, caplog
):
    project = ProjectFactory()
    flush()

    def submit(items):
        raise RuntimeError("hand-off broke")

    monkeypatch.setattr(publisher, "submit", submit)
    with transaction.atomic():  # the save's caller sees its commit succeed
        item = Item.objects.create(project=project, title="kept")
        realtime.emit(f"project:{project.pk}", "v1:note.added", {"n": 1})
    assert "hand-off broke" in caplog.text
    # Both commit hooks ran (a failing one did not stop the next), and both events wait for
    # the relay.
    left = Event.objects.filter(published_at__isnull=True, stream__name=f"project:{project.pk}")
    assert sorted(left.values_list("type", flat=True)) == ["v1:item.created", "v1:note.added"]
    assert Item.objects.filter(pk=item.pk).exists()


def test_relay_does_not_republish_what_on_commit_published():
    ItemFactory()
    flush()
    assert not Event.objects.filter(published_at__isnull=True).exists()
    with record_group_sends() as sent:
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
    assert sent == []


def test_relay_waits_for_the_grace_period(failing_layer):
    ItemFactory()
    flush()
    del failing_layer.group_send
    with record_group_sends() as sent:
        call_command("realtime_relay", "--once", "--grace", "60", verbosity=0)
    assert sent == []
    assert Event.objects.filter(published_at__isnull=True).count() == 3


def test_full_publish_queue_sheds_to_the_relay(settings):
    project = ProjectFactory()
    flush()
    settings.REALTIME = {"PUBLISH_QUEUE_SIZE": 0}
    shed = publisher.shed
    Item.objects.create(project=project, title="shed")
    flush()
    assert publisher.shed - shed == 1
    [pending] = Event.objects.filter(published_at__isnull=True)
    assert pending.type == "v1:item.created"
    settings.REALTIME = {}
    call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
    assert not Event.objects.filter(published_at__isnull=True).exists()


def test_emit_instances_covers_bulk_create_and_queryset_update():
    project = ProjectFactory()
    flush()
    items = Item.objects.bulk_create([Item(project=project, title=f"bulk {i}") for i in range(3)])
    assert [e.type for e in events(f"project:{project.pk}")] == ["v1:project.created"]
    with transaction.atomic():
        assert realtime.emit_instances(items, "created") == 3
    Item.objects.filter(project=project).update(done=True)
    assert realtime.emit_instances(Item.objects.filter(project=project), "updated") == 3
    flush()
    logged = events(f"project:{project.pk}")[1:]
    assert [e.type for e in logged] == ["v1:item.created"] * 3 + ["v1:item.updated"] * 3
    assert [e.data["done"] for e in logged] == [False] * 3 + [True] * 3
    assert [e.seq for e in logged] == [2, 3, 4, 5, 6, 7]
    assert not Event.objects.filter(published_at__isnull=True).exists()


def test_emit_instances_refuses_unregistered_models_and_bad_actions():
    from board.models import Organization

    with pytest.raises(RegistrationError, match="not registered"):
        realtime.emit_instances([Organization(name="x")])
    with pytest.raises(ValueError, match="action must be"):
        realtime.emit_instances([], "moved")


def test_template_with_a_none_field_makes_no_stream():
    realtime.register(Project, streams="org:{organization_id}", version="v4", name="proj")
    try:
        registration = realtime.registry.registry.for_model(Project)[-1]
        assert registration.stream_names(Project(organization_id=None)) == []
        assert registration.stream_names(Project(organization_id=3)) == ["org:3"]
    finally:
        realtime.registry.registry.unregister(Project, version="v4")


def test_saving_no_fields_sends_nothing():
    item = ItemFactory()
    flush()
    count = Event.objects.count()
    item.save(update_fields=[])
    assert Event.objects.count() == count


def test_relay_pass_stops_at_the_first_failure(failing_layer):
    project = ProjectFactory()
    for n in range(4):
        Item.objects.create(project=project, title=str(n))
    flush()
    calls = []
    original = failing_layer.group_send

    async def counting(group, message):
        calls.append(group)
        await original(group, message)

    failing_layer.group_send = counting
    result = realtime.log.relay_once(grace=0)
    assert (result.found, result.published, result.failed) == (6, 0, 6)
    assert len(calls) == 1


def test_events_saved_by_a_script_are_published_and_marked_before_it_exits():
    import subprocess
    import sys

    from .live import ROOT, database_url

    project = ProjectFactory()
    flush()
    script = (
        "from board.models import Item\n"
        f"for n in range(3): Item.objects.create(project_id={project.pk}, title=str(n))\n"
    )
    env = {**__import__("os").environ, "DATABASE_URL": database_url()}
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    created = Event.objects.filter(type="v1:item.created", stream__name=f"project:{project.pk}")
    assert created.count() == 3
    assert not created.filter(published_at__isnull=True).exists()


# -- emit_many -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_emit_many_continues_each_streams_seqs_and_publishes_after_commit():
    realtime.emit("user:1", "v1:note.added", {"n": 0})
    flush()
    with record_group_sends() as sent:
        with transaction.atomic():
            envelopes = realtime.emit_many(
                [
                    ("user:1", "v1:note.added", {"n": 1}),
                    ("user:2", "v1:note.added", {"n": 2}),
                    ("user:1", "v1:note.added", {"n": 3}),
                    ("user:3", "v1:note.added", None),
                ],
                batch_size=2,
            )
            assert sent == []
        flush()
    assert [(e.stream, e.seq) for e in envelopes] == [
        ("user:1", 2),
        ("user:2", 1),
        ("user:1", 3),
        ("user:3", 1),
    ]
    rows = Event.objects.filter(stream__name="user:1").order_by("seq")
    assert [(r.seq, r.data) for r in rows] == [(1, {"n": 0}), (2, {"n": 1}), (3, {"n": 3})]
    assert all(r.published_at is not None for r in rows)
    assert [m["seq"] for _g, m in sent] == [2, 1, 3, 1]
    assert Stream.objects.get(name="user:1").last_seq == 3


@pytest.mark.django_db
def test_emit_many_validates_everything_before_writing():
    with pytest.raises(ValueError, match="invalid event type"):
        realtime.emit_many([("user:1", "v1:note.added", {}), ("user:2", "bad", {})])
    with pytest.raises(TypeError):
        realtime.emit_many([("user:1", "v1:note.added", {"x": object()})])
    with pytest.raises(InvalidStreamName):
        realtime.emit_many([("no stream", "v1:note.added", {})])
    assert not Event.objects.exists()
    assert realtime.emit_many([]) == []


@pytest.mark.django_db(transaction=True, reset_sequences=True, databases=["default", "other"])
def test_published_marks_go_to_the_database_the_event_was_logged_in(failing_layer):
    """Two logs, one per database, with the same event pks: each mark lands in its own."""
    del failing_layer.group_send  # the layer works; it fails for one stream only, below
    original = failing_layer.group_send

    async def group_send(group, message):
        if message.get("stream") == "tenant:down":
            raise ConnectionError("layer down for this send")
        await original(group, message)

    failing_layer.group_send = group_send
    realtime.emit("tenant:down", "v1:note.added", {"db": "default"})  # left for the relay
    flush()
    publisher.resume()
    realtime.emit("tenant:up", "v1:note.added", {"db": "other"}, using="other")  # sent
    flush()
    on_default = Event.objects.using("default").get()
    on_other = Event.objects.using("other").get()
    assert on_default.pk == on_other.pk  # the same pk in both logs
    assert on_other.published_at is not None
    assert on_default.published_at is None  # the relay of "default" still sends it
    del failing_layer.group_send
    with record_group_sends() as sent:
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)
    assert [m["stream"] for _group, m in sent] == ["tenant:down"]


@pytest.fixture
def refusing_layer():
    """The channel layer refuses the messages of one group, as it does a malformed one."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    original = layer.group_send
    refused = group_name("bad:1")
    calls = []

    async def group_send(group, message):
        calls.append(group)
        if group == refused:
            raise TypeError("Group name must be a valid unicode string")
        await original(group, message)

    layer.group_send = group_send
    yield calls
    layer.__dict__.pop("group_send", None)


def test_a_message_the_layer_refuses_does_not_pause_the_live_path(refusing_layer):
    realtime.emit("bad:1", "v1:note.added", {"n": 1})
    realtime.emit("good:1", "v1:note.added", {"n": 2})
    flush()
    # The refusal is about one message, not a layer that is down: the next event goes live.
    assert not Event.objects.filter(stream__name="good:1", published_at__isnull=True).exists()
    assert Event.objects.filter(stream__name="bad:1", published_at__isnull=True).count() == 1
    assert refusing_layer == [group_name("bad:1"), group_name("good:1")]


def test_a_refused_stream_does_not_starve_the_relay_of_the_others(refusing_layer, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(publisher, "submit", lambda items: None)  # all wait for the relay
        for n in range(3):
            realtime.emit("bad:1", "v1:note.added", {"n": n})  # the first stream rows
        realtime.emit("good:1", "v1:note.added", {"n": 9})
    result = realtime.log.relay_once(grace=0, limit=3)
    # One try of the refused stream (its later events wait behind the first, in order), then
    # the remaining budget goes to the other streams.
    assert refusing_layer == [group_name("bad:1"), group_name("good:1")]
    assert (result.found, result.published, result.failed) == (4, 1, 3)
    assert not Event.objects.filter(stream__name="good:1", published_at__isnull=True).exists()
    assert Event.objects.filter(stream__name="bad:1", published_at__isnull=True).count() == 3


def test_a_busy_publisher_bounds_its_inbox_and_sheds_only_the_overflow(settings):
    # While the loop is busy, submissions gather in the worker's inbox. They used to gather
    # without bound, and then the whole merged burst was shed at once.
    import threading

    from realtime.publisher import Outgoing, Publisher

    settings.REALTIME = {"PUBLISH_QUEUE_SIZE": 5}
    local = Publisher()
    loop = local._ensure_private_loop()
    busy, release = threading.Event(), threading.Event()

    def block():
        busy.set()
        release.wait(10)

    loop.call_soon_threadsafe(block)
    assert busy.wait(5)
    try:
        for batch in range(3):
            local.submit(
                Outgoing(-1, "s:1", batch * 3 + n, "rt.s.1", {"type": "x"}) for n in range(3)
            )
        worker = local._workers[loop]
        assert len(worker.inbox) == 5  # the first five; the other four were shed at once
        assert local.shed == 4
    finally:
        release.set()
    with record_group_sends() as sent:
        assert local.flush(5)
    assert [message["type"] for _, message in sent] == ["x"] * 5
    assert (local.submitted, local.finished, local.shed) == (9, 9, 4)
    from django.db import connections

    local.acker.call(connections.close_all, 5)  # its own connection, before the db goes
    loop.call_soon_threadsafe(loop.stop)


def test_the_live_frame_is_the_logged_event_even_if_the_caller_changes_its_data():
    data = {"tags": ["a"]}
    with record_group_sends() as sent:
        with transaction.atomic():
            realtime.emit("note:1", "v1:note.added", data)
            data["tags"].append("b")  # the caller reuses its dict before the commit
            data["extra"] = 1
        flush()
    [logged] = events("note:1")
    assert logged.data == {"tags": ["a"]}
    [(_group, message)] = sent
    assert frame(message)["data"] == {"tags": ["a"]}
    assert frame(message)["eventId"] == str(logged.event_id)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_data_json_cannot_carry_is_refused_before_anything_is_written(value):
    # Python's json writes NaN and Infinity, which no browser parses and PostgreSQL's jsonb
    # refuses after the model row was written.
    with pytest.raises(ValueError, match="not JSON compliant"):
        realtime.emit("note:1", "v1:note.added", {"x": [value]})
    with pytest.raises(ValueError, match="not JSON compliant"):
        realtime.emit_many([("note:1", "v1:note.added", {"x": value})])
    assert not Event.objects.exists()


def test_a_save_whose_event_data_json_cannot_carry_fails_whole_and_clearly():
    project = ProjectFactory()
    realtime.register(
        Project,
        streams="org:{organization_id}",
        version="v5",
        name="proj",
        serializer=lambda p: {"score": float("nan")},
    )
    try:
        count = Event.objects.count()
        project.name = "renamed"
        with pytest.raises(ValueError, match=r"org:\d+ \(v5:proj\.updated\).*not JSON"):
            project.save()
    finally:
        realtime.registry.registry.unregister(Project, version="v5")
    assert Event.objects.count() == count
    assert Project.objects.get(pk=project.pk).name != "renamed"  # the save rolled back


def test_a_relay_pass_with_a_refusal_and_a_layer_failure_does_not_try_the_layer_again(
    refusing_layer, monkeypatch
):
    from channels.layers import get_channel_layer

    with monkeypatch.context() as patched:
        patched.setattr(publisher, "submit", lambda items: None)  # all wait for the relay
        realtime.emit("bad:1", "v1:note.added", {"n": 1})
        realtime.emit("good:1", "v1:note.added", {"n": 2})
        realtime.emit("other:1", "v1:note.added", {"n": 3})
    layer = get_channel_layer()
    refusing = layer.group_send

    async def down_after_the_refusal(group, message):
        await refusing(group, message)  # bad:1 is refused (TypeError) and recorded
        raise ConnectionError("layer down")  # anything else: the layer fails

    layer.group_send = down_after_the_refusal
    result = realtime.log.relay_once(grace=0, limit=10)
    # bad:1 refused, good:1 failed with the layer down: the pass ends there, without a
    # second round that would pay the layer's timeout again for other:1.
    assert refusing_layer == [group_name("bad:1"), group_name("good:1")]
    assert (result.found, result.published) == (3, 0)


def test_events_logged_outside_a_request_share_one_correlation_id_per_transaction():
    """A shell, a worker or a command without `realtime.correlation()`: the events of one
    transaction are correlated with each other, never left without an id."""
    with transaction.atomic():
        first = realtime.emit("tenant:cid", "v1:report.ready", {"n": 1})
        ProjectFactory()  # a model change in the same transaction
        second = realtime.emit("tenant:cid", "v1:report.ready", {"n": 2})
    later = realtime.emit("tenant:cid", "v1:report.ready", {"n": 3})  # its own transaction
    flush()
    assert first.correlation_id
    assert first.correlation_id == second.correlation_id
    rows = Event.objects.filter(correlation_id=first.correlation_id)
    assert rows.count() == 4  # both emits, and the project's events on its two streams
    assert later.correlation_id
    assert later.correlation_id != first.correlation_id
    with realtime.correlation("job-9"):
        assert realtime.emit("tenant:cid", "v1:report.ready", {}).correlation_id == "job-9"


def test_one_atomic_object_used_twice_gives_each_transaction_its_own_correlation_id():
    atomic = transaction.atomic()  # as `@transaction.atomic` reuses one object per function

    def job(n: int) -> str:
        with atomic:
            return realtime.emit("tenant:cid2", "v1:report.ready", {"n": n}).correlation_id

    first, second = job(1), job(2)
    assert first
    assert second != first

    def rolled_back() -> str:
        try:
            with transaction.atomic():
                correlation_id = realtime.emit("tenant:cid2", "v1:report.ready", {}).correlation_id
                raise RuntimeError
        except RuntimeError:
            return correlation_id

    gone = rolled_back()
    assert job(3) not in (first, second, gone)


def test_the_migration_redacts_project_events_already_on_tenant_streams():
    """Events logged before the organization stream got its own payload keep no project name."""
    import importlib
    import types

    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module(
        "board.migrations.0002_tenant_project_events_name_the_project"
    )
    full = {"id": 5, "organization": 3, "name": "Secret", "owner": 9}
    realtime.emit("tenant:3", "v1:project.updated", full)
    realtime.emit("project:5", "v1:project.updated", full)
    realtime.emit("tenant:3", "v1:note.added", {"name": "kept: not a project event"})
    migration.redact_tenant_project_events(apps, types.SimpleNamespace(connection=connection))
    assert [e.data for e in events("tenant:3")] == [
        {"id": 5, "organization": 3},
        {"name": "kept: not a project event"},
    ]
    assert events("project:5")[0].data == full
