"""Fault 3: the publish after commit never happens for 1,000 saves, and the relay that
publishes them is killed (SIGKILL) mid-way and started again.

The writer's after-commit publish is dropped (as when its process dies between commit and
publish), so the 1,000 committed events wait in the log. A `realtime_relay` process
publishes them through a private redis-server to a daphne node with three subscribed
clients, and is killed after some hundreds; a second relay finishes. Each client ends with
every event exactly once after dedupe, in seq order.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from unittest import mock

import pytest

from board.models import Item
from realtime.models import Event
from realtime.publisher import publisher

from ..live import ROOT, Daphne, database_url
from . import connect, events, team

SAVES = 1_000
CLIENTS = 3

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


def relay(env: dict[str, str], log) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "realtime_relay",
            "--grace",
            "0",
            "--batch",
            "20",
            "--interval",
            "0.05",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_events_survive_a_relay_killed_mid_batch_exactly_once_after_dedupe(private_redis, tmp_path):
    people = team(CLIENTS)
    project, stream, base, sessions = people.project, people.stream, people.base, people.sessions
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url(),
        "REDIS_URL": private_redis.url,
        "DEBUG": "1",
    }
    with Daphne(env, tmp_path / "daphne.log") as node:
        url = f"ws://127.0.0.1:{node.port}/ws/realtime/"

        async def client(session: str, stop: asyncio.Event) -> list[tuple[int, str]]:
            got: list[tuple[int, str]] = []
            async with connect(
                url,
                session,
            ) as socket:
                while json.loads(await socket.recv()).get("op") != "welcome":
                    pass
                await socket.send(
                    json.dumps({"op": "subscribe", "ref": "s", "stream": stream, "since": base})
                )
                async for frame in events(socket, lambda: not stop.is_set()):
                    got.append((frame["seq"], frame["eventId"]))
            return got

        async def scenario():
            stop = asyncio.Event()
            clients = [asyncio.create_task(client(s, stop)) for s in sessions]
            await asyncio.sleep(1.0)  # subscribed

            def write() -> None:
                from django.db import connection

                # The after-commit publish is lost: the events stay unpublished in the log.
                with mock.patch.object(publisher, "submit"):
                    for n in range(SAVES):
                        Item.objects.create(project=project, title=f"item {n}", position=n)
                connection.close()

            await asyncio.to_thread(write)
            first = relay(env, log)
            deadline = time.monotonic() + 60
            while (
                await asyncio.to_thread(
                    lambda: Event.objects.filter(
                        stream__name=stream, published_at__isnull=False, seq__gt=base
                    ).count()
                )
                < 300
            ):
                assert time.monotonic() < deadline, "the first relay published too little"
                await asyncio.sleep(0.05)
            first.kill()  # SIGKILL mid-batch: some events sent, not marked published
            first.wait(10)
            unpublished = await asyncio.to_thread(
                lambda: Event.objects.filter(published_at__isnull=True).count()
            )
            second = relay(env, log)
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(
                lambda: Event.objects.filter(published_at__isnull=True).exists()
            ):
                assert time.monotonic() < deadline, "the second relay did not finish"
                await asyncio.sleep(0.1)
            second.terminate()
            second.wait(10)
            await asyncio.sleep(1.5)  # the last deliveries
            stop.set()
            return await asyncio.gather(*clients), unpublished

        with open(tmp_path / "relay.log", "wb") as log:
            results, unpublished = asyncio.run(scenario())

    expected = list(
        Event.objects.filter(stream__name=stream, seq__gt=base)
        .order_by("seq")
        .values_list("seq", "event_id")
    )
    assert len(expected) == SAVES
    assert 0 < unpublished < SAVES  # the first relay really was cut off mid-way
    want = [(seq, str(event_id)) for seq, event_id in expected]
    for got in results:
        deduped = list(dict.fromkeys(got))  # dedupe by (seq, eventId), keeping the first
        assert deduped == want  # every event, once, in seq order
