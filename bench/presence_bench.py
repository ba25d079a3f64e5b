"""Presence with 1,000 members in one stream: join/leave throughput and member-list latency.

Runs the presence backends directly (no sockets), on this machine's Redis (a key prefix of
its own, deleted after) and in memory, and prints a Markdown table. References in the same
run: a hand-rolled Redis hash per stream (HSET on join, HDEL on leave, HGETALL to list), the
way presence is often added to a Channels consumer, which counts neither tabs nor expiry,
so it shows a user twice or never lets a crashed node's users go. Progress goes to stderr.

Measured: 1,000 joins one after another and 1,000 concurrently (gathered), the member list
(the backend's `members`, and the full REST/subscribe-reply list with display fields read from
the database, SQLite here), one refresh of 1,000 entries (what a node does every TTL/3), a
sweep expiring 1,000 entries, and 1,000 leaves.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from services import DEFAULT_REDIS_URL, Unavailable, redis_answers, sqlite_database  # noqa: E402

MEMBERS = 1000
LIST_READS = 200
STREAM = "project:1"


def progress(message: str) -> None:
    print(f"[presence_bench] {message}", file=sys.stderr, flush=True)


async def timed(run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


async def latencies(run: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_backend(backend: Any, user_ids: list[str], with_display: bool) -> dict[str, Any]:
    from presence.tracker import member_list

    now = time.time()
    row: dict[str, Any] = {}
    row["join_seq"] = MEMBERS / await timed(
        lambda: _each(backend.join, [(STREAM, u, f"c{u}", "n", now + 60, now) for u in user_ids])
    )
    row["second_tab"] = MEMBERS / await timed(
        lambda: _each(backend.join, [(STREAM, u, f"d{u}", "n", now + 60, now) for u in user_ids])
    )
    members = await latencies(lambda: backend.members(STREAM), LIST_READS)
    row["members_p50"], row["members_p99"] = p(members, 0.5), p(members, 0.99)
    assert len(await backend.members(STREAM)) == MEMBERS
    if with_display:
        full = await latencies(lambda: member_list(STREAM), 20)
        row["list_p50"], row["list_p99"] = p(full, 0.5), p(full, 0.99)
    entries = [(STREAM, u, f"c{u}") for u in user_ids]
    row["refresh_ms"] = 1000 * await timed(lambda: backend.refresh(entries, "n", now + 90, now))
    for u in user_ids:  # the second tabs go, one by one: no user leaves
        assert not await backend.leave(STREAM, u, f"d{u}")
    # Expire them all at once (a node died): the sweep.
    left: list[Any] = []

    async def expire() -> None:
        while batch := await backend.expire(now + 1000):
            left.extend(batch)

    row["sweep_ms"] = 1000 * await timed(expire)
    assert len(left) == MEMBERS, len(left)
    await _each(backend.join, [(STREAM, u, f"c{u}", "n", now + 60, now) for u in user_ids])
    row["leave_seq"] = MEMBERS / await timed(
        lambda: _each(backend.leave, [(STREAM, u, f"c{u}") for u in user_ids])
    )
    row["join_concurrent"] = MEMBERS / await timed(
        lambda: asyncio.gather(
            *(backend.join(STREAM, u, f"c{u}", "n", now + 60, now) for u in user_ids)
        )
    )
    await asyncio.gather(*(backend.leave(STREAM, u, f"c{u}") for u in user_ids))
    return row


async def _each(method: Callable[..., Awaitable[Any]], calls: list[tuple[Any, ...]]) -> None:
    for args in calls:
        await method(*args)


async def measure_hand_rolled(url: str, user_ids: list[str]) -> dict[str, Any]:
    import redis.asyncio as redis

    pool = redis.BlockingConnectionPool.from_url(url, max_connections=20, decode_responses=True)
    client = redis.Redis(connection_pool=pool)
    key = f"bench-presence-{uuid.uuid4().hex}"
    try:
        row: dict[str, Any] = {}
        row["join_seq"] = MEMBERS / await timed(
            lambda: _each(client.hset, [(key, u, "1") for u in user_ids])
        )
        members = await latencies(lambda: client.hgetall(key), LIST_READS)
        row["members_p50"], row["members_p99"] = p(members, 0.5), p(members, 0.99)
        row["leave_seq"] = MEMBERS / await timed(
            lambda: _each(client.hdel, [(key, u) for u in user_ids])
        )
        row["join_concurrent"] = MEMBERS / await timed(
            lambda: asyncio.gather(*(client.hset(key, u, "1") for u in user_ids))
        )
        return row
    finally:
        await client.delete(key)
        await client.aclose()


def main() -> None:
    redis_url = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    with sqlite_database() as database_url:
        os.environ.update(
            DJANGO_SETTINGS_MODULE="config.settings",
            DATABASE_URL=database_url,
            REDIS_URL="",
            DEBUG="0",
            SECRET_KEY=os.environ.get("SECRET_KEY", "bench-only-not-a-secret"),
        )
        sys.path.insert(0, str(ROOT))
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", interactive=False, verbosity=0)
        from django.contrib.auth import get_user_model

        User = get_user_model()
        User.objects.bulk_create(User(username=f"member{i}") for i in range(MEMBERS))
        members = User.objects.filter(username__startswith="member").order_by("pk")
        user_ids = [str(pk) for pk in members.values_list("pk", flat=True)]
        rows: list[tuple[str, dict[str, Any]]] = []
        try:
            redis_answers(redis_url)
        except Unavailable as exc:
            progress(f"{exc}; Redis rows skipped")
            redis_url = ""
        from presence.backends.memory import MemoryBackend

        if redis_url:
            from django.test import override_settings

            from presence.backends.redis import RedisBackend

            prefix = f"bench-presence-{uuid.uuid4().hex}"
            config = {"url": redis_url, "prefix": prefix}
            with override_settings(
                PRESENCE={"BACKEND": "presence.backends.redis.RedisBackend", "CONFIG": config}
            ):
                progress("Redis backend")
                backend = RedisBackend(**config)

                async def redis_run() -> dict[str, Any]:
                    from presence.tracker import get_backend

                    try:
                        return await measure_backend(backend, user_ids, with_display=True)
                    finally:
                        await backend.close()
                        await get_backend().close()

                rows.append(
                    ("ours: Redis backend (Lua, sorted set by expiry)", asyncio.run(redis_run()))
                )
            progress("hand-rolled Redis hash")
            rows.append(
                (
                    "hand-rolled HSET/HDEL (no tabs, no expiry)",
                    asyncio.run(measure_hand_rolled(redis_url, user_ids)),
                )
            )
        from django.test import override_settings

        with override_settings(PRESENCE={"BACKEND": "presence.backends.memory.MemoryBackend"}):
            progress("memory backend")
            rows.append(
                (
                    "ours: memory backend (one process)",
                    asyncio.run(measure_backend(MemoryBackend(), user_ids, with_display=True)),
                )
            )
    print(table(rows))


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "n/a"

    lines = [
        f"# Presence: {MEMBERS:,} members in one stream",
        "",
        __doc__.split("\n\n", 1)[1].split("Progress goes")[0].strip()
        + "\n\n"
        + __doc__.split("\n\n")[2].strip(),
        "",
        "| backend | joins/s (one by one) | joins/s (concurrent) | second tabs/s | leaves/s "
        "| members() p50/p99 ms | full list p50/p99 ms | refresh 1,000 ms | sweep 1,000 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows:
        lines.append(
            f"| {name} | {cell(row, 'join_seq', ',.0f')} | {cell(row, 'join_concurrent', ',.0f')} "
            f"| {cell(row, 'second_tab', ',.0f')} | {cell(row, 'leave_seq', ',.0f')} "
            f"| {cell(row, 'members_p50', '.2f')} / {cell(row, 'members_p99', '.2f')} "
            f"| {cell(row, 'list_p50', '.1f')} / {cell(row, 'list_p99', '.1f')} "
            f"| {cell(row, 'refresh_ms', '.1f')} | {cell(row, 'sweep_ms', '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
