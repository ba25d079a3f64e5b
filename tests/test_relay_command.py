"""The relay command's loop, output and argument checks."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from realtime.models import Event
from realtime.testing import flush, record_group_sends

from .factories import ItemFactory, ProjectFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    "args",
    [
        ["--batch", "0"],
        ["--batch", str(2**63)],  # no query can take it
        ["--grace", "-1"],
        ["--grace", "nan"],
        ["--grace", "inf"],  # no cutoff can be made from it: every pass would fail
        ["--grace", "1e300"],
        ["--interval", "nan"],
    ],
)
def test_bad_arguments_are_refused(args):
    # Refused as arguments, before any pass (which would fail on them, in a loop for good).
    with pytest.raises(CommandError, match=f"^{args[0]} must"):
        call_command("realtime_relay", "--once", *args)


def test_max_passes_below_one_is_refused():
    with pytest.raises(CommandError, match="--max-passes"):
        call_command("realtime_relay", "--max-passes", "0")


def test_once_reports_what_it_did(capsys):
    call_command("realtime_relay", "--once")
    assert "relay: 0 published, 0 failed of 0 pending" in capsys.readouterr().out


def test_once_fails_when_events_could_not_be_published(monkeypatch, capsys):
    # For cron and supervisors: a single pass that left events behind exits non-zero.
    from channels.layers import get_channel_layer

    ItemFactory()
    flush()
    Event.objects.update(published_at=None)
    layer = get_channel_layer()

    async def group_send(group, message):
        raise ConnectionError("layer down")

    monkeypatch.setattr(layer, "group_send", group_send)
    with pytest.raises(CommandError, match="3 event"):
        call_command("realtime_relay", "--once", "--grace", "0")
    assert "relay: 0 published, 3 failed of 3 pending" in capsys.readouterr().out
    assert Event.objects.filter(published_at__isnull=True).count() == 3


def test_once_fails_when_the_pass_fails(monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("database gone")

    monkeypatch.setattr("realtime.management.commands.realtime_relay.relay_once", broken)
    with pytest.raises(CommandError, match="database gone"):
        call_command("realtime_relay", "--once")


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


@pytest.mark.django_db
def test_realtime_stats_prints_connections_streams_rates_and_backlog():
    import io

    from realtime.models import Connection

    owner = UserFactory()
    project = ProjectFactory(owner=owner)
    for n, transport in enumerate(["websocket", "websocket", "sse"]):
        Connection.objects.create(
            id=f"c{n}",
            user=owner,
            node="node-a" if n < 2 else "node-b",
            transport=transport,
            subscriptions=[f"project:{project.pk}"],
            last_seen=timezone.now(),
        )
    out = io.StringIO()
    call_command("realtime_stats", stdout=out)
    text = out.getvalue()
    assert "live connections: 3 (1 users)" in text
    assert "node-a" in text
    assert f"project:{project.pk}" in text
    assert "3 subscriber(s)" in text
    assert "relay backlog:" in text
    assert "v1:project.created" in text


def test_the_callers_signal_handlers_are_back_after_the_command():
    """call_command() in a process of its own (a scheduler): its SIGINT and SIGTERM handlers
    work again once the relay returns, rather than setting the finished run's stop event."""
    import signal

    def mine(*_args) -> None:
        pass

    before = signal.signal(signal.SIGTERM, mine)
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        call_command("realtime_relay", "--once", verbosity=0)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, before)
