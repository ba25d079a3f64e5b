"""The relay command's loop, output and argument checks."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from realtime.models import Event
from realtime.testing import flush, record_group_sends

from .factories import ItemFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("args", [["--batch", "0"], ["--grace", "-1"]])
def test_bad_arguments_are_refused(args):
    with pytest.raises(CommandError):
        call_command("realtime_relay", "--once", *args)


def test_once_reports_what_it_did(capsys):
    call_command("realtime_relay", "--once")
    assert "relay: 0 published, 0 failed of 0 pending" in capsys.readouterr().out


def test_loop_drains_a_backlog_in_batches_and_stops_after_max_passes(capsys):
    ItemFactory.create_batch(3)
    flush()
    Event.objects.update(published_at=None)  # as if the process died before publishing
    with record_group_sends() as sent:
        call_command(
            "realtime_relay",
            "--grace",
            "0",
            "--batch",
            "4",
            "--interval",
            "0.05",
            "--max-passes",
            "5",
        )
    # 3 projects x 2 streams + 3 items = 9 events, all sent once, in per-stream seq order.
    assert len(sent) == 9
    assert len({m["eventId"] for _, m in sent}) == 9
    by_stream: dict[str, list[int]] = {}
    for _, message in sent:
        by_stream.setdefault(message["stream"], []).append(message["seq"])
    assert all(seqs == sorted(seqs) for seqs in by_stream.values())
    assert not Event.objects.filter(published_at__isnull=True).exists()
    assert "relay: 4 published" in capsys.readouterr().out
