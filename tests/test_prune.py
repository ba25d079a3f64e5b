"""Retention: by age and by count per stream, in batches, never unpublished events."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import realtime
from realtime.models import Event, Stream
from realtime.testing import flush

pytestmark = pytest.mark.django_db(transaction=True)


def emit_many(stream: str, n: int) -> None:
    for i in range(n):
        realtime.emit(stream, "v1:tick.happened", {"i": i})
    flush()


def test_prune_by_count_keeps_the_newest_per_stream():
    emit_many("tenant:a", 12)
    emit_many("tenant:b", 3)
    call_command("realtime_prune", "--max-events", "5", "--batch", "2", verbosity=0)
    assert list(
        Event.objects.filter(stream__name="tenant:a").values_list("seq", flat=True).order_by("seq")
    ) == [8, 9, 10, 11, 12]
    assert Event.objects.filter(stream__name="tenant:b").count() == 3
    assert Stream.objects.get(name="tenant:a").last_seq == 12  # positions never go back


def test_prune_by_age():
    emit_many("tenant:a", 4)
    old = timezone.now() - dt.timedelta(days=10)
    Event.objects.filter(seq__lte=2).update(timestamp=old)
    call_command("realtime_prune", "--max-age", str(7 * 86400), verbosity=0)
    assert sorted(Event.objects.values_list("seq", flat=True)) == [3, 4]


def test_prune_never_deletes_unpublished_events_nor_leaves_a_hole_below_one():
    emit_many("tenant:a", 4)
    Event.objects.filter(seq=3).update(published_at=None)
    call_command("realtime_prune", "--max-events", "0", verbosity=0)
    # 1 and 2 go; 3 waits for the relay, and 4 stays so that a resume never skips 3..4.
    assert sorted(Event.objects.values_list("seq", flat=True)) == [3, 4]


def test_prune_reports_progress(capsys):
    emit_many("tenant:a", 5)
    call_command("realtime_prune", "--max-events", "1", "--batch", "2", verbosity=2)
    out = capsys.readouterr().out
    assert "2 deleted (tenant:a)" in out
    assert "4 deleted (tenant:a)" in out
    assert "pruned 4 event(s)" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--max-age", "-1"],
        ["--max-age", "nan"],
        ["--max-events", "-2"],
        ["--batch", "0"],
        ["--batch", str(2**63)],  # no DELETE can bind it
    ],
)
def test_prune_rejects_bad_arguments(args):
    with pytest.raises(CommandError):
        call_command("realtime_prune", *args)


def test_a_count_past_any_column_keeps_every_event():
    realtime.emit("user:1", "v1:note.added", {})
    flush()
    call_command("realtime_prune", "--max-events", str(2**63), verbosity=0)
    assert Event.objects.filter(stream__name="user:1").count() == 1


def test_a_stream_kinds_retention_overrides_the_default():
    from realtime.policies import UserPolicy, stream_kinds

    class ShortHistory(UserPolicy):
        retention = 2

    stream_kinds.register("brief", ShortHistory)
    try:
        emit_many("brief:x", 5)
        emit_many("tenant:a", 5)
        call_command("realtime_prune", "--max-events", "4", "--max-age", "999999", verbosity=0)
        assert sorted(
            Event.objects.filter(stream__name="brief:x").values_list("seq", flat=True)
        ) == [4, 5]
        assert Event.objects.filter(stream__name="tenant:a").count() == 4
    finally:
        stream_kinds.unregister("brief")


def test_age_prune_deletes_only_below_the_first_young_event_of_a_stream():
    """Timestamps need not rise with seq (taken before the stream lock, or on nodes whose
    clocks differ): an old event above a young one stays, so the log keeps no hole."""
    from realtime.log import prune
    from realtime.replay import position, read_typed_after

    emit_many("project:1", 4)
    then = timezone.now() - dt.timedelta(days=8)
    for seq, offset in ((1, 0), (2, 3), (3, 1)):  # seq 3 stamped before seq 2
        Event.objects.filter(seq=seq).update(timestamp=then + dt.timedelta(seconds=offset))
    cutoff = then + dt.timedelta(seconds=2)  # seqs 1 and 3 are older, seq 2 is not
    assert prune(max_age=(timezone.now() - cutoff).total_seconds()) == 1
    assert position("project:1").covers(1, None)
    assert [row[0] for row in read_typed_after("project:1", 1, 10)] == [2, 3, 4]


@pytest.mark.parametrize("max_age", ["inf", "1e12"])
def test_an_age_older_than_any_date_keeps_every_event(max_age):
    emit_many("tenant:a", 3)
    Event.objects.update(timestamp=timezone.now() - dt.timedelta(days=365 * 50))
    call_command("realtime_prune", "--max-age", max_age, verbosity=0)
    assert Event.objects.count() == 3
