"""PostgreSQL: concurrent writers get gapless seqs in commit order."""

from __future__ import annotations

import random
import threading
import time

import pytest
from django.db import connection, transaction

from board.models import Item
from realtime.models import Event, Stream
from realtime.testing import flush

from .factories import ItemFactory, ProjectFactory

THREADS = 8
SAVES = 50


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
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(pk: int) -> None:
        try:
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
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(item.pk,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
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
