"""PostgreSQL: concurrent writes through the API; If-Match and Idempotency-Key under a race."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from django.db import connection
from django.db.models import signals
from rest_framework.test import APIClient

from board.models import Item

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def client_for(user: Any) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def someone_waits_on_me() -> bool:
    """Whether another session waits for a lock this session holds (pg_locks is read live)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted "
            "AND pg_backend_pid() = ANY(pg_blocking_pids(pid)))"
        )
        return bool(cursor.fetchone()[0])


class Hold:
    """A save receiver that keeps the first request inside its transaction until the second
    has either reached the same point (it was not stopped) or waits on a lock the first holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first: int | None = None
        self.second_arrived = threading.Event()
        self.second_waited = False

    def __call__(self, **kwargs: Any) -> None:
        with self.lock:
            if self.first is not None:
                self.second_arrived.set()
                return
            self.first = threading.get_ident()
        deadline = time.monotonic() + 30
        while not self.second_arrived.wait(0.02):
            if someone_waits_on_me():
                self.second_waited = True
                return
            if time.monotonic() > deadline:
                raise AssertionError("the second request neither arrived nor waited")


@pytest.fixture
def hold() -> Iterator[Callable[..., Hold]]:
    connected: list[tuple[Any, Hold, Any]] = []

    def connect(*on: Any, sender: Any = Item) -> Hold:
        receiver = Hold()
        for signal in on:
            signal.connect(receiver, sender=sender, weak=False)
            connected.append((signal, receiver, sender))
        return receiver

    yield connect
    for signal, receiver, sender in connected:
        signal.disconnect(receiver, sender=sender)


def run_together(*requests: Callable[[], Any]) -> list[Any]:
    """Run the requests in threads started at once; their responses, in the same order."""
    barrier = threading.Barrier(len(requests))
    results: list[Any] = [None] * len(requests)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(10)
            results[n] = requests[n]()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    return results


def two_patches_with_one_etag(hold: Callable[..., Hold]) -> tuple[Item, list[Any], Hold]:
    """Two PATCHes of one item sent at once with the same If-Match, the first held inside its
    transaction: (the item, the responses, the hold)."""
    owner = UserFactory()
    item = cast(Item, ItemFactory(project=ProjectFactory(owner=owner), title="first"))
    url = f"/api/items/{item.pk}/"
    etag = client_for(owner).get(url)["ETag"]
    held = hold(signals.pre_save)

    def patch(title: str) -> Callable[[], Any]:
        return lambda: client_for(owner).patch(
            url, {"title": title}, format="json", HTTP_IF_MATCH=etag
        )

    return item, run_together(patch("from a"), patch("from b")), held


def test_two_patches_with_the_same_if_match_change_the_item_once(hold):
    """Both read the same ETag; the first is held after its If-Match check, inside its
    transaction. The second must wait for the row and then fail the check, not overwrite."""
    item, responses, held = two_patches_with_one_etag(hold)
    assert sorted(r.status_code for r in responses) == [200, 412]
    assert held.second_waited  # the second was stopped by the row lock, not by luck
    winner = next(r for r in responses if r.status_code == 200)
    item.refresh_from_db()
    assert item.title == winner.data["title"]
    assert item.version == 2  # one save after the factory's


def test_a_delete_racing_a_patch_with_the_same_if_match_lets_only_one_happen(hold):
    """Whichever comes first is held inside its transaction; the other then finds the item
    changed (412) or gone (404)."""
    owner = UserFactory()
    item = ItemFactory(project=ProjectFactory(owner=owner), title="first")
    url = f"/api/items/{item.pk}/"
    etag = client_for(owner).get(url)["ETag"]
    held = hold(signals.pre_save, signals.pre_delete)

    def patch() -> Any:
        return client_for(owner).patch(url, {"title": "patched"}, format="json", HTTP_IF_MATCH=etag)

    def delete() -> Any:
        return client_for(owner).delete(url, HTTP_IF_MATCH=etag)

    patched, deleted = run_together(patch, delete)
    assert held.second_waited
    outcome = (patched.status_code, deleted.status_code)
    assert outcome in {(200, 412), (404, 204)}
    left = Item.objects.filter(pk=item.pk).values_list("title", flat=True)
    assert list(left) == (["patched"] if outcome == (200, 412) else [])


def test_a_retry_while_the_first_post_runs_waits_and_replays_it(hold):
    """The Idempotency-Key's row is written in the create's transaction: a concurrent retry
    waits on its unique key until the first commits, then replays the first's answer."""
    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    url = f"/api/projects/{project.pk}/items/"
    held = hold(signals.post_save)  # the first is held after the item's insert

    def post() -> Any:
        return client_for(owner).post(
            url, {"title": "once"}, format="json", HTTP_IDEMPOTENCY_KEY="retry-1"
        )

    first, second = run_together(post, post)
    assert held.second_waited
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    replayed = [r for r in (first, second) if r.has_header("Idempotent-Replayed")]
    assert len(replayed) == 1
    assert replayed[0]["Idempotent-Replayed"] == "true"
    assert Item.objects.filter(project=project, title="once").count() == 1


def test_if_match_locks_a_row_of_a_distinct_queryset_too(hold, monkeypatch):
    """PostgreSQL refuses FOR UPDATE with DISTINCT: such a view locks the row by its pk."""
    from board.api import ItemViewSet

    original = ItemViewSet.get_queryset
    monkeypatch.setattr(ItemViewSet, "get_queryset", lambda self: original(self).distinct())
    item, responses, held = two_patches_with_one_etag(hold)
    assert sorted(r.status_code for r in responses) == [200, 412]
    assert held.second_waited
    item.refresh_from_db()
    assert item.title == next(r for r in responses if r.status_code == 200).data["title"]


def test_two_creates_of_one_project_name_at_once_are_a_201_and_a_400(hold):
    """Both pass the serializer's check of the name; the second's insert waits on the first's
    unique key, then fails it once the first commits: a 400 as the check's, not a 500."""
    from board.models import Project
    from board.serializers import NAME_TAKEN

    from .factories import OrganizationFactory

    owner = UserFactory()
    organization = OrganizationFactory()
    organization.members.add(owner)
    held = hold(signals.post_save, sender=Project)  # the first is held after its insert

    def post() -> Any:
        return client_for(owner).post(
            "/api/projects/", {"organization": organization.pk, "name": "Twin"}, format="json"
        )

    responses = run_together(post, post)
    assert held.second_waited
    assert sorted(r.status_code for r in responses) == [201, 400]
    refused = next(r for r in responses if r.status_code == 400)
    assert refused.json() == {"non_field_errors": [NAME_TAKEN]}
    assert Project.objects.filter(organization=organization, name="Twin").count() == 1


@pytest.mark.parametrize("change", ["read", "delete"])
def test_a_notification_marked_or_deleted_during_a_read_all_waits_and_does_not_deadlock(
    monkeypatch, change
):
    """The change holds the notification's row when a read-all starts. The read-all takes the
    user's stream, then waits for that row; the change used to ask for the stream next, and
    PostgreSQL aborted one of the two (a 500). Both lock the stream first now."""
    import notifications.api as notifications_api
    from notifications import notify
    from realtime.testing import flush

    bob = UserFactory()
    (note,) = notify(bob, "liked")
    notify(bob, "commented")
    flush()
    name = "set_read" if change == "read" else "soft_delete"
    real = getattr(notifications_api, name)
    threads: list[threading.Thread] = []
    outcome: list[Any] = []

    def read_all() -> None:
        try:
            outcome.append(client_for(bob).post("/api/notifications/read-all/").status_code)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            connection.close()

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        # The row is locked (and, fixed, the stream): a read-all starts and has to wait on us.
        thread = threading.Thread(target=read_all)
        threads.append(thread)
        thread.start()
        deadline = time.monotonic() + 10
        while not someone_waits_on_me():
            assert time.monotonic() < deadline, "the read-all never waited for this request"
            time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(notifications_api, name, meanwhile)
    url = f"/api/notifications/{note.pk}/"
    client = client_for(bob)
    client.raise_request_exception = False
    response = client.post(f"{url}read/") if change == "read" else client.delete(url)
    (thread,) = threads
    thread.join(30)
    flush()
    assert response.status_code == (200 if change == "read" else 204)
    assert outcome == [200]
