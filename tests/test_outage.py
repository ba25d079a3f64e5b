"""A real Redis that goes away: events stay in the log, and the relay publishes them later."""

from __future__ import annotations

import json
import os

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command

from board.models import Item
from realtime.models import Event
from realtime.publisher import publisher
from realtime.testing import flush, receive_published

from .factories import ProjectFactory


def redis_layer(url: str) -> dict:
    """The demo's layer on `url`, under the prefix the demo's settings give it: daphne
    children of the test inherit REDIS_PREFIX (tests/settings_test.py), and a layer of this
    process under another prefix would publish where none of them listens."""
    site = os.environ.get("REDIS_PREFIX", "").strip()
    return {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [{"address": url, "socket_timeout": None}],
                "prefix": f"{site}.asgi" if site else "asgi",
            },
        }
    }


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_events_committed_while_redis_is_down_are_relayed_after_it_returns(private_redis, settings):
    settings.CHANNEL_LAYERS = redis_layer(private_redis.url)
    settings.REALTIME = {"PUBLISH_TIMEOUT": 2.0}
    project = ProjectFactory()
    stream = f"project:{project.pk}"
    flush()
    assert not Event.objects.filter(published_at__isnull=True).exists()

    private_redis.stop()
    failed = publisher.failed
    Item.objects.create(project=project, title="while redis is down")
    flush(timeout=15)
    assert publisher.failed > failed
    [pending] = Event.objects.filter(published_at__isnull=True)
    assert pending.type == "v1:item.created"

    private_redis.start()
    publisher.resume()

    def relay():
        call_command("realtime_relay", "--once", "--grace", "0", verbosity=0)

    [message] = async_to_sync(receive_published)([stream], relay, timeout=10)
    frame = json.loads(message["frames"]["v1"])
    assert frame["eventId"] == str(pending.event_id)
    assert frame["seq"] == pending.seq
    pending.refresh_from_db()
    assert pending.published_at is not None

    # Back to normal: the next save is published live by on_commit, not by the relay.
    def save():
        Item.objects.create(project=project, title="after")

    [live] = async_to_sync(receive_published)([stream], save, timeout=10)
    assert json.loads(live["frames"]["v1"])["seq"] == pending.seq + 1
    assert not Event.objects.filter(published_at__isnull=True).exists()
