"""The demo's config/settings.py: what it reads from the environment about Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOW = (
    "import json, config.settings as s; "
    "print(json.dumps([s.CHANNEL_LAYERS['default'], s.PRESENCE, s.WRITE_RATE, "
    "s.REALTIME['PUBLISH_USER_REDIS']]))"
)


def demo_settings(**env: str) -> list[Any]:
    """config.settings as a fresh process reads it under `env` (connects to nothing)."""
    environ = {k: v for k, v in os.environ.items() if k not in {"REDIS_PREFIX", "REDIS_URL"}}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", SHOW],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(json.loads(out))


def test_redis_prefix_names_the_layer_and_the_presence_keys_of_this_site():
    url = "redis://127.0.0.1:1/3"
    layer, presence, _, buckets = demo_settings(REDIS_URL=url, REDIS_PREFIX="staging")
    assert layer["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert layer["CONFIG"]["prefix"] == "staging.asgi"
    assert presence["CONFIG"] == {"url": url, "prefix": "staging.presence"}
    assert buckets == {"url": url, "prefix": "staging.rt"}  # the users' publish buckets

    layer, presence, _, buckets = demo_settings(REDIS_URL=url)
    assert layer["CONFIG"]["prefix"] == "asgi"  # channels-redis' own default
    assert presence["CONFIG"]["prefix"] == "presence"
    assert buckets == {"url": url, "prefix": "rt"}

    layer, presence, _, buckets = demo_settings()
    assert layer == {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    assert presence == {"BACKEND": "presence.backends.memory.MemoryBackend"}
    assert buckets is None  # one process: its own bucket is every node's


def test_the_write_rate_is_read_from_the_environment_and_can_be_turned_off():
    assert demo_settings()[2] == "300/min"
    assert demo_settings(REALTIME_WRITE_RATE="20/s")[2] == "20/s"
    for off in ("off", "none", "0", ""):
        assert demo_settings(REALTIME_WRITE_RATE=off)[2] is None


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_databases_do_not_separate_pub_sub_sites_prefixes_do():
    """Why docs/operations.md asks sites sharing one Redis for a prefix of their own and not
    just a database number of their own: pub/sub channels ignore the database."""
    from channels_redis.pubsub import RedisPubSubChannelLayer

    base = os.environ["REDIS_URL"].rsplit("/", 1)[0]
    group = f"site-test-{uuid.uuid4().hex}"
    listener = RedisPubSubChannelLayer(hosts=[f"{base}/1"])
    same_prefix = RedisPubSubChannelLayer(hosts=[f"{base}/2"])
    own_prefix = RedisPubSubChannelLayer(hosts=[f"{base}/2"], prefix="other-site.asgi")
    try:
        channel = await listener.new_channel()
        await listener.group_add(group, channel)
        await own_prefix.group_send(group, {"type": "x", "n": 1})
        await same_prefix.group_send(group, {"type": "x", "n": 2})
        # The other database's message arrives; the other prefix's never does.
        received = await asyncio.wait_for(listener.receive(channel), 5)
        assert received == {"type": "x", "n": 2}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(listener.receive(channel), 0.5)
    finally:
        for layer in (listener, same_prefix, own_prefix):
            await layer.flush()
