"""Fault 5: the link between one node and Redis stalls for 10 s: a black hole, not a reset.

Node A reaches the private redis-server through a `TcpProxy`. Node B connects to it
directly, and so does this process, which writes the events. The stall thus cuts off one
node, as a network fault near one host would, while Redis, the writer and node B carry on.
Nothing fails there, so the node has to notice by itself. Node B is the control: it must
not report a stall. Two clients follow the stream on each node. They behave as the JS client
does: they dedupe by seq, and resync from the log (`subscribe` with `since`) only when a seq
jumps, never on silence alone. The proxy holds every byte in both directions for 10 s while
the writer emits at a steady rate. Then the writer stops. A quiet stream shows no jump, so
only the node itself can fill what its clients missed. After that, more events must arrive
live through node A, without a restart and without a resync by its clients.

The test runs twice. In the first run the paused connections come back when the pause ends
(TCP survives a short partition). In the second they stay black-holed for good (a NAT or
firewall lost their state), while new connections work. In that case a node that never
notices stays deaf for good.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from typing import Any

import pytest
from django.db import connection

import realtime
from realtime.models import Event, Stream
from realtime.testing import flush, session_for

from ..factories import UserFactory
from ..live import Daphne, database_url
from ..test_outage import redis_layer
from . import connect, events, team
from .tcp_proxy import TcpProxy

STALL = 10.0
RATE = 20.0  # events per second
BEFORE = 40  # events before the stall
AFTER = 40  # events once node A is back
PER_NODE = 2
PROBE = 1.0  # LAYER_PROBE_INTERVAL of the nodes

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.fault,
    pytest.mark.django_db(transaction=True),
]


class Reader:
    """A websocket client keeping one stream in order: dedupe by seq, resync on a seq jump."""

    def __init__(self, url: str, session: str, stream: str, base: int) -> None:
        self.url, self.session, self.stream = url, session, stream
        self.last = base
        self.seqs: list[int] = []
        self.event_ids: set[str] = set()
        self.duplicates = 0
        self.resyncs = 0
        self.refs = 0
        self.stop = False

    async def run(self) -> None:
        async with connect(self.url, self.session, max_queue=None) as socket:
            self.socket = socket
            await self._until("welcome")
            await self._subscribe()
            async for frame in events(socket, lambda: not self.stop):
                seq = frame["seq"]
                if seq <= self.last:
                    self.duplicates += 1
                elif seq == self.last + 1:
                    self.last = seq
                    self.seqs.append(seq)
                    self.event_ids.add(frame["eventId"])
                else:  # a gap: resume from the log, as the JS client does
                    self.resyncs += 1
                    await self._send("unsubscribe")
                    await self._subscribe()

    async def _until(self, op: str, ref: str | None = None) -> dict[str, Any]:
        while True:
            frame = json.loads(await asyncio.wait_for(self.socket.recv(), 20))
            if frame.get("op") == "ping":
                await self.socket.send('{"op":"pong"}')
            elif frame.get("op") == op and (ref is None or frame.get("ref") == ref):
                return frame  # events arriving meanwhile are dropped: the resume sends them

    async def _send(self, op: str, **fields: Any) -> dict[str, Any]:
        self.refs += 1
        ref = f"r{self.refs}"
        await self.socket.send(json.dumps({"op": op, "ref": ref, "stream": self.stream, **fields}))
        reply = await self._until("reply", ref)
        assert reply["ok"] is True, reply
        return reply

    async def _subscribe(self) -> None:
        reply = await self._send("subscribe", since=self.last)
        assert reply["data"]["recovered"] is True, reply


def write(stream: str, count: int | None = None, seconds: float | None = None) -> int:
    """Emit events at RATE (`count` of them, or for `seconds`); return the stream's last seq."""
    try:
        start = time.monotonic()
        n = 0
        while (count is None or n < count) and (
            seconds is None or time.monotonic() - start < seconds
        ):
            realtime.emit(stream, "v1:fault.tick", {"n": n})
            n += 1
            time.sleep(max(0.0, start + n / RATE - time.monotonic()))
        flush(timeout=10)
        return Stream.objects.get(name=stream).last_seq
    finally:
        connection.close()


def metrics(node: Daphne, session: str) -> dict[str, float]:
    """The node's counters that tell a stall from a recovery, read at /realtime/metrics."""
    request = urllib.request.Request(
        node.url("/realtime/metrics"), headers={"Cookie": f"sessionid={session}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    names = {
        "stalls": "realtime_layer_stalls_total",
        "delivered": "realtime_events_delivered_total",
        "replayed": 'realtime_events_replayed_total{transport="websocket"}',
    }
    values = {}
    for key, name in names.items():
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        values[key] = float(found[1]) if found else 0.0
    return values


async def until(condition: Any, seconds: float, what: Any, tasks: list[Any]) -> None:
    """Wait until `condition()` holds; fail with `what()` after `seconds`, or as a task did."""
    deadline = time.monotonic() + seconds
    while not condition():
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
        if time.monotonic() > deadline:
            raise AssertionError(what())
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("revive", [True, False], ids=["link-comes-back", "link-lost"])
def test_a_node_cut_off_from_redis_notices_reconnects_and_its_clients_miss_nothing(
    private_redis, settings, tmp_path, revive
):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)  # this process: direct
    people = team(2 * PER_NODE)
    stream, base = people.stream, people.base
    staff = session_for(UserFactory(is_staff=True))
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings_live",
        "DATABASE_URL": database_url(),
        "DEBUG": "1",
        "TEST_REALTIME": json.dumps({"LAYER_PROBE_INTERVAL": PROBE}),
    }
    with (
        TcpProxy("127.0.0.1", private_redis.port) as proxy,
        Daphne({**env, "REDIS_URL": proxy.url}, tmp_path / "a.log") as node_a,
        Daphne({**env, "REDIS_URL": private_redis.url}, tmp_path / "b.log") as node_b,
    ):
        nodes = [node_a] * PER_NODE + [node_b] * PER_NODE
        readers = [
            Reader(f"ws://127.0.0.1:{node.port}/ws/realtime/", session, stream, base)
            for node, session in zip(nodes, people.sessions, strict=True)
        ]
        on_a = readers[:PER_NODE]

        def behind(group: list[Reader], seq: int) -> Any:
            return lambda: f"stuck at {[r.last for r in group]} of {seq}"

        async def scenario() -> dict[str, Any]:
            tasks = [asyncio.create_task(reader.run()) for reader in readers]

            async def all_reach(group: list[Reader], seq: int) -> None:
                await until(
                    lambda: all(r.last >= seq for r in group), 20, behind(group, seq), tasks
                )

            try:
                await asyncio.sleep(1.0)  # the readers subscribe
                first = await asyncio.to_thread(write, stream, count=BEFORE)
                await all_reach(readers, first)
                proxy.pause()
                stalled = await asyncio.to_thread(write, stream, seconds=STALL)
                proxy.resume(revive=revive)
                # The writer is quiet now: only node A itself can fill its readers' gap.
                await all_reach(on_a, stalled)
                recovered = await asyncio.to_thread(metrics, node_a, staff)
                resyncs = [r.resyncs for r in on_a]
                last = await asyncio.to_thread(write, stream, count=AFTER)
                await all_reach(readers, last)
                return {
                    "first": first,
                    "stalled": stalled,
                    "last": last,
                    "a": recovered,
                    "a_after": await asyncio.to_thread(metrics, node_a, staff),
                    "b": await asyncio.to_thread(metrics, node_b, staff),
                    "client_resyncs_after": [r.resyncs for r in on_a] != resyncs,
                }
            finally:
                for reader in readers:
                    reader.stop = True
                await asyncio.gather(*tasks, return_exceptions=True)

        result = asyncio.run(scenario())
        log_a = node_a.output()

    # Shown with -s: the resyncs and duplicates the readers saw themselves.
    print(result, [(r.resyncs, r.duplicates) for r in readers])
    logged = list(Event.objects.filter(stream__name=stream).order_by("seq"))
    expected = [event.seq for event in logged if event.seq > base]
    assert expected[-1] == result["last"]
    for reader in readers:
        assert reader.seqs == expected, f"{reader.url}: {len(reader.seqs)} of {len(expected)}"
        assert {str(e.event_id) for e in logged if e.seq > base} <= reader.event_ids
    # Node A noticed the silent link by itself and said so, and its readers were resynced
    # from the log; node B saw nothing wrong.
    assert result["a"]["stalls"] >= 1
    assert "channel layer silent" in log_a, log_a[-3000:]
    assert "channel layer answers again" in log_a, log_a[-3000:]
    assert result["a"]["replayed"] > 0
    assert result["b"]["stalls"] == 0
    # After the stall, events reach node A's readers live through the layer again, without
    # a resync by the readers.
    assert result["a_after"]["delivered"] - result["a"]["delivered"] >= AFTER * PER_NODE
    assert not result["client_resyncs_after"]
