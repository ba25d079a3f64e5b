"""PostgreSQL: concurrent writers get gapless seqs in commit order."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from django.db import connection, transaction

from board.models import Item
from realtime.models import Event, Stream
from realtime.testing import flush

from .factories import ItemFactory, ProjectFactory

THREADS = 8
SAVES = 50


def run_threads(calls: list[tuple[Any, tuple[Any, ...]]], timeout: float) -> list[BaseException]:
    """Run each (function, args) in a thread of its own, each closing its database connection
    after; wait up to `timeout` for each; return what they raised."""
    errors: list[BaseException] = []

    def run(function: Any, args: tuple[Any, ...]) -> None:
        try:
            function(*args)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return errors


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_saves_get_gapless_seqs_in_commit_order():
    project = ProjectFactory()
    items = [ItemFactory(project=project) for _ in range(THREADS)]
    stream = Stream.objects.get(name=f"project:{project.pk}")
    base = stream.last_seq
    flush()
    barrier = threading.Barrier(THREADS)
    observed: list[tuple[int, int, int]] = []  # (my seq, visible max, visible count after base)
    lock = threading.Lock()

    def writer(pk: int) -> None:
        rng = random.Random(pk)
        barrier.wait(10)
        for n in range(SAVES):
            with transaction.atomic():
                item = Item.objects.get(pk=pk)
                item.title = f"save {n}"
                item.save()
                visible = Event.objects.filter(stream=stream, seq__gt=base)
                mine = visible.filter(type="v1:item.updated").order_by("-seq")[0]
                row = (mine.seq, max(visible.values_list("seq", flat=True)), visible.count())
                time.sleep(rng.random() / 1000)  # hold the lock a little before commit
            with lock:
                observed.append(row)

    errors = run_threads([(writer, (item.pk,)) for item in items], 120)
    assert not errors, errors[0]
    flush()

    seqs = sorted(seq for seq, _, _ in observed)
    assert seqs == list(range(base + 1, base + THREADS * SAVES + 1))  # no gap, no duplicate
    for seq, visible_max, visible_count in observed:
        # When a writer held seq n, every seq below n was already committed (visible to it)
        # and none above n existed: commits happen in seq order.
        assert visible_max == seq
        assert visible_count == seq - base
    stream.refresh_from_db()
    assert stream.last_seq == base + THREADS * SAVES
    assert Event.objects.filter(stream=stream, seq__gt=base).count() == THREADS * SAVES


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_bulk_emits_and_single_emits_on_shared_streams_stay_gapless_without_deadlock():
    """4 threads of emit_many over the same 50 streams (in different orders) and 4 threads of
    single emits: the stream rows are locked in pk order, so no deadlock, and every stream's
    seqs are 1..n with no gap or duplicate."""
    import realtime

    streams = [f"user:{9000 + i}" for i in range(50)]
    realtime.emit_many((s, "v1:note.added", {}) for s in streams)  # the rows exist
    flush()
    barrier = threading.Barrier(THREADS)

    def bulk(n: int) -> None:
        rng = random.Random(n)
        barrier.wait(10)
        for _ in range(10):
            order = streams[:]
            rng.shuffle(order)
            with transaction.atomic():
                realtime.emit_many(((s, "v1:note.added", {"by": n}) for s in order), batch_size=17)
                time.sleep(rng.random() / 500)

    def single(n: int) -> None:
        rng = random.Random(n)
        barrier.wait(10)
        for _ in range(50):
            realtime.emit(rng.choice(streams), "v1:note.added", {"by": n})

    errors = run_threads([(bulk if i % 2 else single, (i,)) for i in range(THREADS)], 120)
    assert not errors, errors[0]
    flush()
    for stream in Stream.objects.filter(name__in=streams):
        seqs = list(
            Event.objects.filter(stream=stream).order_by("seq").values_list("seq", flat=True)
        )
        assert seqs == list(range(1, stream.last_seq + 1)), stream.name
    assert Event.objects.filter(stream__name__in=streams).count() == 50 + 4 * 10 * 50 + 4 * 50


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_bulk_emits_that_make_the_same_new_streams_in_other_orders_do_not_deadlock():
    """Two emit_many calls whose streams do not exist yet, given in opposite orders, one row
    per batch: an INSERT of a name another transaction inserted waits for that transaction,
    so rows made in the order given would close a cycle. Both commit, in some order."""
    import realtime

    streams = [f"user:{9500 + i}" for i in range(20)]
    barrier = threading.Barrier(2)

    def bulk(order: list[str]) -> None:
        barrier.wait(10)
        with transaction.atomic():
            realtime.emit_many(((s, "v1:note.added", {}) for s in order), batch_size=1)
            time.sleep(0.05)

    errors = run_threads([(bulk, (order,)) for order in (streams, streams[::-1])], 60)
    assert not errors, errors[0]
    flush()
    for stream in Stream.objects.filter(name__in=streams):
        seqs = list(Event.objects.filter(stream=stream).values_list("seq", flat=True))
        assert sorted(seqs) == [1, 2], stream.name
    assert Stream.objects.filter(name__in=streams).count() == 20
