"""The same changes read over WebSocket, SSE and the event feed are the same events."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from board.models import Item
from realtime.testing import RealtimeClient, session_for

from .factories import ItemFactory, ProjectFactory, UserFactory
from .test_sse import SSEReader

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio, pytest.mark.slow]
db = sync_to_async
CHANGES = 500


async def test_500_changes_are_identical_over_websocket_sse_and_feed():
    import realtime

    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    items = [await db(ItemFactory)(project=project) for _ in range(5)]
    streams = [f"project:{project.pk}", f"user:{owner.pk}"]

    ws = RealtimeClient(session_key=await db(session_for)(owner))
    await ws.connect()
    for stream in streams:
        assert (await ws.subscribe(stream))["ok"]
    http = AsyncClient()
    await http.aforce_login(owner)
    sse = SSEReader(await http.get("/realtime/sse/", {"streams": ",".join(streams)}))
    await sse.message()  # retry:
    cursor = (await http.get("/api/realtime/events/", {"streams": ",".join(streams)})).json()[
        "cursor"
    ]

    def change_things():
        for n in range(CHANGES):
            if n % 5 == 4:
                realtime.emit(streams[1], "v1:note.added", {"n": n})
            else:
                item = Item.objects.get(pk=items[n % 5].pk)
                item.title = f"change {n}"
                item.save()

    await db(change_things)()

    over_ws = []
    while len(over_ws) < CHANGES:
        frame = await ws.receive_until("event")
        over_ws.append((frame["stream"], frame["seq"], frame["eventId"]))
    over_sse = []
    while len(over_sse) < CHANGES:
        data = (await sse.event())["data"]
        over_sse.append((data["stream"], data["seq"], data["eventId"]))
    over_feed = []
    while len(over_feed) < CHANGES:
        body = (
            await http.get(
                "/api/realtime/events/",
                {"streams": ",".join(streams), "cursor": cursor, "limit": 120},
            )
        ).json()
        assert body["events"], "the feed ran dry before all changes were read"
        over_feed += [(e["stream"], e["seq"], e["eventId"]) for e in body["events"]]
        cursor = body["cursor"]
    await sse.close()
    await ws.close()

    def per_stream(events):
        return {s: [e for e in events if e[0] == s] for s in streams}

    assert per_stream(over_ws) == per_stream(over_sse) == per_stream(over_feed)
    assert len(set(over_ws)) == CHANGES
    for events in per_stream(over_ws).values():
        seqs = [seq for _s, seq, _id in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, no gap
