"""Connection rows: swept when their node goes silent; the presence sweeper; the ALLOWED_HOSTS
check."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from realtime.checks import check_allowed_hosts
from realtime.connections import sweep, touch_node
from realtime.models import Connection

from .conftest import free_port


@pytest.mark.django_db(transaction=True)  # touch_node runs on worker threads, in autocommit
def test_rows_of_a_silent_node_are_swept_and_live_ones_kept(settings):
    settings.REALTIME = {"CONNECTION_SWEEP_AFTER": 60}
    old = timezone.now() - dt.timedelta(seconds=120)
    Connection.objects.create(id="dead1", node="dead:1", last_seen=old)
    Connection.objects.create(id="live1", node="live:1", last_seen=old)
    assert touch_node("live:1", ["live1"]) == 1  # the live node's heartbeat refreshes its rows
    assert set(Connection.objects.values_list("id", flat=True)) == {"live1"}
    assert sweep() == 0


@pytest.mark.django_db(transaction=True)
def test_a_row_its_live_node_no_longer_holds_is_swept_too(settings):
    """A row left behind by a socket whose cleanup never ran (cancelled while its row was
    being written, or a failed delete) is not refreshed by its node's heartbeat."""
    settings.REALTIME = {"CONNECTION_SWEEP_AFTER": 60}
    old = timezone.now() - dt.timedelta(seconds=120)
    Connection.objects.create(id="held", node="live:1", last_seen=old)
    Connection.objects.create(id="leaked", node="live:1", last_seen=old)
    many = [f"other{n}" for n in range(1200)]  # past SQLite's old 999-parameter limit
    assert touch_node("live:1", ["held", *many]) == 1
    assert set(Connection.objects.values_list("id", flat=True)) == {"held"}


@pytest.mark.parametrize(
    ("hosts", "debug", "errors"),
    [(["*"], False, 1), (["*"], True, 0), (["example.com"], False, 0)],
)
def test_wildcard_allowed_hosts_outside_debug_is_an_error(settings, hosts, debug, errors):
    settings.ALLOWED_HOSTS = hosts
    settings.DEBUG = debug
    found = check_allowed_hosts()
    assert len(found) == errors
    assert all(e.id == "realtime.E020" for e in found)


@pytest.mark.parametrize("interval", ["0", "-1"])
def test_presence_sweep_refuses_an_interval_that_is_not_positive(interval):
    with pytest.raises(CommandError):
        call_command("presence_sweep", "--once", "--interval", interval)


def test_presence_sweep_outlives_a_presence_backend_that_is_down(settings, capsys):
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.PRESENCE = {"BACKEND": "presence.backends.redis.RedisBackend", "CONFIG": {"url": down}}
    call_command("presence_sweep", "--interval", "0.05", "--max-runtime", "0.5")
    assert capsys.readouterr().err.count("presence sweep failed") >= 2
    with pytest.raises(CommandError):  # one sweep asked for, and it failed: exit status 1
        call_command("presence_sweep", "--once")


def test_presence_sweep_stops_at_its_max_runtime_not_an_interval_later(settings, capsys):
    # A backend of its own: the run's shared one (Redis under REDIS_URL) holds other tests'
    # entries, which a sweep would rightly announce.
    settings.PRESENCE = {
        "BACKEND": "presence.backends.memory.MemoryBackend",
        "CONFIG": {"run": uuid.uuid4().hex},  # a new instance, not one another test filled
    }
    started = time.monotonic()
    call_command("presence_sweep", "--interval", "30", "--max-runtime", "0.2")
    assert time.monotonic() - started < 10
    assert "presence sweep: 0 leave(s) announced" in capsys.readouterr().out


def test_presence_sweep_stops_on_sigterm_while_a_sweep_hangs(tmp_path):
    """A Redis that takes the connection and never answers (paused): SIGTERM, as systemd
    sends it, ends the sweep at once instead of after the backend's timeouts (5 s per call
    for the Redis backend; a backend without one would never end)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts; nobody ever reads or answers
    port = silent.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    process = subprocess.Popen(
        [sys.executable, "manage.py", "presence_sweep", "--interval", "60"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the sweep's connection is in
            silent.settimeout(0.5)
            try:
                held, _ = silent.accept()
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("the sweep never connected")
        time.sleep(0.5)  # it sent its command and waits for the answer
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)  # waited on for good before the fix
        assert b"stopped during a sweep" in err
        held.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        silent.close()
