"""Client publishes are limited per socket and per user: more sockets buy no more events."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from board.membership import add_member
from realtime.testing import RealtimeClient, session_for

from .conftest import need, redis_names
from .factories import ProjectFactory, UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

db = sync_to_async


async def test_two_sockets_of_one_user_share_the_users_bucket(settings):
    # Burst 3 per socket and per user; a rate that does not refill a token during the test.
    settings.REALTIME = {"PUBLISH_RATE": 0.001, "PUBLISH_BURST": 3}
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    session = await db(session_for)(owner)
    first, second = RealtimeClient(session_key=session), RealtimeClient(session_key=session)
    await first.connect()
    await second.connect()

    async def publish(client: RealtimeClient) -> dict:
        return await client.request("publish", stream=stream, type="v1:typing.started", data={})

    assert [(await publish(first))["ok"] for _ in range(2)] == [True, True]
    assert (await publish(second))["ok"] is True
    # Each socket has spent at most 2 of its own 3 tokens; the user has spent all 3.
    for client in (second, first):
        refused = await publish(client)
        assert refused["ok"] is False
        assert refused["error"]["code"] == "rate_limited"
    # A publish the user's bucket refused did not cost the socket one of its own tokens:
    # once the user has tokens again, the second socket still has its 2 left.
    from realtime.ratelimit import _user_buckets

    _user_buckets.clear()
    assert [(await publish(second))["ok"] for _ in range(3)] == [True, True, False]
    await first.close()
    await second.close()


async def test_another_user_has_a_bucket_of_its_own(settings):
    settings.REALTIME = {"PUBLISH_RATE": 0.001, "PUBLISH_BURST": 1}
    owner = await db(UserFactory)()
    project = await db(ProjectFactory)(owner=owner)
    stream = f"project:{project.pk}"
    spender = await db(UserFactory)()
    await db(add_member)(project, spender)
    a = RealtimeClient(session_key=await db(session_for)(spender))
    b = RealtimeClient(session_key=await db(session_for)(owner))
    await a.connect()
    await b.connect()
    for client in (a, b):
        reply = await client.request("publish", stream=stream, type="v1:typing.started", data={})
        assert reply["ok"] is True
    again = await a.request("publish", stream=stream, type="v1:typing.started", data={})
    assert again["error"]["code"] == "rate_limited"
    await a.close()
    await b.close()


# -- the user's bucket shared by every node (REALTIME["PUBLISH_USER_REDIS"]) -----------------


def shared_settings(settings, url: str, burst: int) -> None:

    settings.REALTIME = {
        "PUBLISH_RATE": 0.001,  # no token comes back during the test
        "PUBLISH_BURST": burst,
        "PUBLISH_USER_REDIS": {"url": url, "prefix": redis_names()},
    }


def another_node() -> None:
    """What a second node has: no bucket of this user's, and a Redis client of its own."""
    from realtime import ratelimit

    ratelimit._user_buckets.clear()
    ratelimit._shared._clients.clear()


@pytest.fixture
def redis_url():
    """The run's Redis (the keys a test makes there go with the run's: tests/conftest.py)."""
    import os

    need(bool(os.environ.get("REDIS_URL")), "REDIS_URL is not set")
    return os.environ["REDIS_URL"]


async def test_the_users_bucket_is_one_for_every_node_with_redis(settings, redis_url):
    from realtime.ratelimit import take_user_token

    shared_settings(settings, redis_url, burst=5)
    user = await db(UserFactory)()
    taken = [await take_user_token(user.pk) for _ in range(3)]
    another_node()
    taken += [await take_user_token(user.pk) for _ in range(5)]
    assert taken == [True] * 5 + [False] * 3  # 5 in all, not 5 on each node
    other = await db(UserFactory)()
    assert await take_user_token(other.pk) is True  # a bucket of its own

    # Without the setting each node has its own: 3 + 5 of 8 would pass.
    settings.REALTIME = {"PUBLISH_RATE": 0.001, "PUBLISH_BURST": 5}
    alone = [await take_user_token(user.pk) for _ in range(3)]
    another_node()
    alone += [await take_user_token(user.pk) for _ in range(5)]
    assert alone == [True] * 8


async def test_a_redis_out_of_reach_limits_per_node_and_says_so_once(settings, caplog):
    import logging

    from realtime.ratelimit import _shared, take_user_token

    from .conftest import free_port

    shared_settings(settings, f"redis://127.0.0.1:{free_port()}/0", burst=3)  # nothing listens
    _shared._warned = 0.0
    user = await db(UserFactory)()
    with caplog.at_level(logging.WARNING, logger="realtime.ratelimit"):
        taken = [await take_user_token(user.pk) for _ in range(5)]
    assert taken == [True, True, True, False, False]  # this node's bucket, burst 3
    warnings = [r for r in caplog.records if "shared publish buckets unavailable" in r.message]
    assert len(warnings) == 1


async def test_a_node_never_passes_its_own_limit_when_redis_goes_away(settings, private_redis):
    from realtime.ratelimit import take_user_token

    shared_settings(settings, private_redis.url, burst=3)
    user = await db(UserFactory)()
    taken = [await take_user_token(user.pk) for _ in range(2)]  # both buckets pay
    private_redis.stop()
    taken += [await take_user_token(user.pk) for _ in range(3)]
    # 3 on this node in all, as without Redis (the node's bucket had been charged too).
    assert taken == [True, True, True, False, False]


async def test_a_stalled_redis_costs_one_wait_then_the_node_decides_alone(settings):
    import asyncio
    import time

    from realtime.ratelimit import take_user_token

    accepted: list[object] = []

    async def silent(reader, writer) -> None:  # accepts, reads, never answers
        accepted.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    shared_settings(settings, f"redis://127.0.0.1:{port}/0", burst=3)
    user = await db(UserFactory)()
    started = time.monotonic()
    taken = [await take_user_token(user.pk) for _ in range(5)]
    elapsed = time.monotonic() - started
    server.close()
    for writer in accepted:
        writer.close()
    assert taken == [True, True, True, False, False]  # the node's bucket
    assert len(accepted) == 1  # only the first take went to Redis; the others rested
    assert elapsed < 10  # it gave up (about 1 s) instead of waiting on the socket
