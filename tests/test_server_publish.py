"""Under daphne, a save in a request is published from the server's loop, after commit."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer

from realtime.models import Event
from realtime.streams import group_name

from .factories import ProjectFactory, UserFactory, server_password
from .live import Browser, Daphne, database_url


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_admin_save_under_daphne_is_published_to_redis_subscribers(tmp_path):
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    server_password(admin, "pw-root-1")
    admin.save()
    project = ProjectFactory(owner=admin)
    stream = f"project:{project.pk}"
    env = {"DATABASE_URL": database_url(), "REDIS_URL": os.environ["REDIS_URL"], "DEBUG": "1"}

    with Daphne(env, tmp_path / "daphne.log") as server:
        browser = Browser(server)
        browser.login("root", "pw-root-1")

        def add_item():
            response = browser.post_form(
                "/admin/board/item/add/",
                {"project": project.pk, "title": "via daphne", "position": 0, "version": 0},
                {"X-Correlation-ID": "e2e-1"},
            )
            assert response.headers["X-Correlation-ID"] == "e2e-1"
            response.close()

        async def listen_and_add():
            layer = get_channel_layer()
            channel = await layer.new_channel()
            await layer.group_add(group_name(stream), channel)
            await sync_to_async(add_item, thread_sensitive=False)()
            async with asyncio.timeout(10):
                return await layer.receive(channel)

        message = async_to_sync(listen_and_add)()
        frame = json.loads(message["frames"]["v1"])
        assert frame["type"] == "v1:item.created"
        assert frame["data"]["title"] == "via daphne"
        assert frame["correlationId"] == "e2e-1"
        event = Event.objects.get(event_id=frame["eventId"])
        deadline = time.monotonic() + 10
        while event.published_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
            event.refresh_from_db()
        assert event.published_at is not None, server.output()
        assert "left for the relay" not in server.output()

        # A ticket in the query string never reaches a log line, even daphne's access log.
        from realtime.tickets import issue

        ticket = issue(admin)

        async def connect_with_ticket():
            import websockets

            url = f"ws://127.0.0.1:{server.port}/ws/realtime/?ticket={ticket}&v=test-1"
            async with websockets.connect(url, origin="http://127.0.0.1") as socket:
                return json.loads(await socket.recv())

        assert async_to_sync(connect_with_ticket)()["op"] == "welcome"
        time.sleep(0.2)
        assert "/ws/realtime/" in server.output()
        assert ticket not in server.output()
