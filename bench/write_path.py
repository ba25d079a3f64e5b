"""Time `Item.save()` with the realtime pipeline off, on, and the naive Channels way; print JSON.

Run once per database (`--database sqlite|postgresql`); `bench/run.py` runs both and turns the
JSON printed on stdout into tables. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

from services import (
    BENCH_DATABASE,
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    Unavailable,
    postgres_database,
    redis_answers,
    sqlite_database,
)

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = "Write path: Item.save()"
#: The issue's target: the pipeline, publish included, adds at most this much to a save.
TARGET_PERCENT = 50.0
#: Each mode's saves are split into rounds run in turn with the other modes, so drift in
#: the machine or the growing tables falls on every mode alike.
ROUNDS = 4
WARMUP_SAVES = 100
OPERATIONS = ("update", "create")
NAIVE_UID = "bench-naive-channels"


@dataclass(frozen=True)
class Mode:
    """One way of saving: pipeline on or off, and what else happens per save."""

    name: str
    about: str
    enabled: bool
    flush: bool = False
    publish: bool = True
    naive: bool = False
    layer: bool = False
    #: Wrap each save in `transaction.atomic()` (the pipeline's own wrapper is off).
    atomic: bool = False


MODES = (
    Mode("plain", "pipeline off (`REALTIME = {'ENABLED': False}`): the baseline", enabled=False),
    Mode(
        "pipeline",
        "pipeline on: event row and seq under the stream lock in the save's transaction, "
        "`on_commit` hand-off to the background publisher; `publisher.flush()` is timed after "
        "each loop, so saves/s and the overhead include the whole publish",
        enabled=True,
        flush=True,
        layer=True,
    ),
    Mode(
        "log only",
        "diagnostic: pipeline on but the `on_commit` hand-off replaced by a no-op, so this is "
        "the in-transaction part of its cost alone (serializing, seq, event row), no publish",
        enabled=True,
        publish=False,
    ),
    Mode(
        "transaction only",
        "diagnostic: pipeline off, each save inside `transaction.atomic()`: the `BEGIN`/`COMMIT` "
        "that the event row needs (the change and its event commit together), with no event; the "
        "part of the pipeline's cost that no publish path can remove",
        enabled=False,
        atomic=True,
    ),
    Mode(
        "naive Channels",
        "pipeline off, and a `post_save` handler doing "
        "`async_to_sync(get_channel_layer().group_send)(group, {...})` with the item's "
        "serializer data, per save (connected for this mode only)",
        enabled=False,
        naive=True,
        layer=True,
    ),
)


@dataclass
class Timing:
    """Latency of each save and the wall time of the loops (publisher flush included)."""

    latencies: list[int] = field(default_factory=list)
    wall: int = 0
    flush: int = 0


def progress(message: str) -> None:
    """Report a phase on stderr."""
    print(f"[write_path] {message}", file=sys.stderr, flush=True)


def setup_django(database_url: str, redis_url: str) -> None:
    """Point config.settings at the benchmark's database and layer, then set up and migrate."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ["DEBUG"] = "0"  # as in production: no per-query log
    os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")
    os.environ["REALTIME_LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def make_project() -> Any:
    """Create the user, organization and project that the items belong to."""
    from django.contrib.auth import get_user_model

    from board.membership import create_project
    from board.models import Organization

    owner = get_user_model().objects.create_user("bench", password=None)
    organization = Organization.objects.create(name="Bench")
    return create_project(organization=organization, name="Bench", owner=owner)


def savers(project: Any) -> dict[str, Callable[[int], None]]:
    """Return the timed operation of each kind: update one loaded item, or create one."""
    from board.models import Item

    item = Item.objects.get(pk=Item.objects.create(project=project, title="bench").pk)

    def update(i: int) -> None:
        item.title = f"update {i}"
        item.save()

    def create(i: int) -> None:
        Item(project=project, title=f"create {i}", position=i).save()

    return {"update": update, "create": create}


def naive_handler() -> Callable[..., None]:
    """Return a post_save receiver that publishes the plain-Channels way."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from board.serializers import ItemSerializer

    def receiver(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
        message = {
            "type": "item.changed",
            "created": created,
            "item": dict(ItemSerializer(instance).data),
        }
        async_to_sync(get_channel_layer().group_send)(f"project-{instance.project_id}", message)

    return receiver


def ignore_publish(*args: Any) -> None:
    """Stand in for the on_commit hand-off in the log-only mode."""


@contextmanager
def active(mode: Mode, receiver: Callable[..., None]) -> Iterator[None]:
    """Switch the pipeline and the naive receiver as `mode` says, for the block."""
    from django.db.models.signals import post_save
    from django.test import override_settings

    from board.models import Item

    with ExitStack() as stack:
        stack.enter_context(override_settings(REALTIME={"ENABLED": mode.enabled}))
        if not mode.publish:
            stack.enter_context(mock.patch("realtime.log.publisher.submit", ignore_publish))
        if mode.naive:
            post_save.connect(receiver, sender=Item, dispatch_uid=NAIVE_UID, weak=False)
            stack.callback(post_save.disconnect, sender=Item, dispatch_uid=NAIVE_UID)
        yield


def in_transaction(save: Callable[[int], None]) -> Callable[[int], None]:
    """Return `save` run inside a transaction of its own."""
    from django.db import transaction

    def atomic_save(i: int) -> None:
        with transaction.atomic():
            save(i)

    return atomic_save


def operation(mode: Mode, save: Callable[[int], None]) -> Callable[[int], None]:
    """The save as `mode` times it."""
    return in_transaction(save) if mode.atomic else save


def time_saves(save: Callable[[int], None], first: int, count: int, flush: bool) -> Timing:
    """Run `count` saves, timing each; with `flush`, time the publisher's flush as well."""
    from realtime.publisher import publisher

    latencies = []
    gc.collect()
    began = time.perf_counter_ns()
    for i in range(first, first + count):
        start = time.perf_counter_ns()
        save(i)
        latencies.append(time.perf_counter_ns() - start)
    looped = time.perf_counter_ns()
    if flush and not publisher.flush(timeout=60):
        raise RuntimeError("publisher.flush() did not finish in 60 s")
    ended = time.perf_counter_ns()
    return Timing(latencies, ended - began, ended - looped)


def counts() -> tuple[int, int]:
    """Return (events logged, events not yet marked published)."""
    from realtime.models import Event

    return Event.objects.count(), Event.objects.filter(published_at__isnull=True).count()


def measure(saves: int) -> dict[tuple[str, str], Timing]:
    """Warm every mode up, then time `saves` saves per mode and operation, in rounds."""
    from realtime.publisher import publisher

    receiver = naive_handler()
    operations = savers(make_project())
    publisher.flush(timeout=30)
    progress(f"warming up ({WARMUP_SAVES} saves per mode and operation)")
    for mode in MODES:
        with active(mode, receiver):
            for name in OPERATIONS:
                time_saves(operation(mode, operations[name]), 0, WARMUP_SAVES, flush=True)
    timings = {(mode.name, name): Timing() for mode in MODES for name in OPERATIONS}
    sizes = [saves // ROUNDS + (1 if r < saves % ROUNDS else 0) for r in range(ROUNDS)]
    done = 0
    for number, size in enumerate(sizes, start=1):
        progress(f"round {number}/{ROUNDS}: {size} saves per mode and operation")
        for mode in MODES:
            with active(mode, receiver):
                for name in OPERATIONS:
                    before = counts()
                    timing = time_saves(operation(mode, operations[name]), done, size, mode.flush)
                    check(mode, size, before, counts())
                    total = timings[mode.name, name]
                    total.latencies += timing.latencies
                    total.wall += timing.wall
                    total.flush += timing.flush
        done += size
    if publisher.failed or publisher.shed:
        raise RuntimeError(f"publisher: {publisher.failed} failed, {publisher.shed} shed")
    return timings


def check(mode: Mode, size: int, before: tuple[int, int], after: tuple[int, int]) -> None:
    """Fail loudly if a mode did not log (or publish) exactly what it should have."""
    logged = after[0] - before[0]
    unpublished = after[1] - before[1]
    want_logged = size if mode.enabled else 0
    want_unpublished = size if mode.enabled and not mode.publish else 0
    if (logged, unpublished) != (want_logged, want_unpublished):
        raise RuntimeError(
            f"{mode.name}: {logged} events logged and {unpublished} left unpublished, "
            f"expected {want_logged} and {want_unpublished}"
        )


def percentile(ordered: list[int], fraction: float) -> int:
    """Nearest-rank percentile of a sorted list."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(timings: dict[tuple[str, str], Timing]) -> dict[str, dict[str, dict[str, float]]]:
    """Per mode and operation: n, mean/p50/p99 ms, flush ms, saves/s and overheads in %."""
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for (mode, name), timing in timings.items():
        ordered = sorted(timing.latencies)
        n = len(ordered)
        stats.setdefault(mode, {})[name] = {
            "n": n,
            "mean_ms": sum(ordered) / n / 1e6,
            "p50_ms": percentile(ordered, 0.50) / 1e6,
            "p99_ms": percentile(ordered, 0.99) / 1e6,
            "flush_ms": timing.flush / 1e6,
            "wall_ms_per_save": timing.wall / n / 1e6,
            "saves_per_s": n / (timing.wall / 1e9),
        }
    for by_name in stats.values():
        for name, row in by_name.items():
            plain = stats["plain"][name]
            row["mean_overhead_pct"] = (row["mean_ms"] / plain["mean_ms"] - 1) * 100
            row["overhead_pct"] = (row["wall_ms_per_save"] / plain["wall_ms_per_save"] - 1) * 100
    return stats


def table(stats: dict[str, dict[str, dict[str, float]]], layer: str) -> dict[str, Any]:
    """Lay the statistics out as columns and rows of text."""
    columns = [
        "mode",
        "save",
        "channel layer",
        "n",
        "mean ms",
        "p50 ms",
        "p99 ms",
        "flush ms",
        "saves/s",
        "mean vs plain",
        "overhead vs plain",
    ]
    rows = []
    for mode in MODES:
        for name in OPERATIONS:
            row = stats[mode.name][name]
            baseline = mode.name == "plain"
            rows.append(
                [
                    mode.name,
                    name,
                    layer if mode.layer else "-",
                    f"{row['n']:,.0f}",
                    f"{row['mean_ms']:.3f}",
                    f"{row['p50_ms']:.3f}",
                    f"{row['p99_ms']:.3f}",
                    f"{row['flush_ms']:.1f}" if mode.flush else "-",
                    f"{row['saves_per_s']:,.0f}",
                    "-" if baseline else f"{row['mean_overhead_pct']:+.1f}%",
                    "-" if baseline else f"{row['overhead_pct']:+.1f}%",
                ]
            )
    return {"columns": columns, "rows": rows}


def verdict(stats: dict[str, dict[str, dict[str, float]]]) -> str:
    """PASS only if the pipeline, publish included, stays within the target for every save."""
    figures = {name: stats["pipeline"][name]["overhead_pct"] for name in OPERATIONS}
    passed = all(value <= TARGET_PERCENT for value in figures.values())
    detail = ", ".join(f"{value:+.1f}% on {name}" for name, value in figures.items())
    floor = ", ".join(
        f"{stats['transaction only'][name]['overhead_pct']:+.1f}% on {name}" for name in OPERATIONS
    )
    return (
        f"{'PASS' if passed else 'MISS'}: the pipeline (publish included) adds {detail} "
        f"(target: at most +{TARGET_PERCENT:.0f}%); the transaction it writes the event in "
        f"costs {floor} alone"
    )


def layer_label(redis_url: str) -> str:
    """Name the channel layer in use, with the Redis server's version."""
    if not redis_url:
        return "in-memory"
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        version = client.info("server")["redis_version"]
    finally:
        client.close()
    return f"Redis {version} pub/sub"


def database_label() -> str:
    """Name the database server in use, with its version."""
    from django.db import connection

    if connection.vendor == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return f"PostgreSQL {cursor.fetchone()[0]}"


def run(database_url: str, redis_url: str, saves: int, notes: list[str]) -> dict[str, Any]:
    """Set Django up on the given database and layer, measure, and return the report."""
    setup_django(database_url, redis_url)
    from django.conf import settings
    from django.db import connections

    from realtime.publisher import close_ack_connections

    layer = layer_label(redis_url)
    title = f"{database_label()}, channel layer: {layer}"
    progress(f"{title}: {saves} saves per mode and operation")
    started = time.monotonic()
    try:
        stats = summarize(measure(saves))
    finally:
        close_ack_connections()
        connections.close_all()
    options = settings.DATABASES["default"].get("OPTIONS", {})
    notes.append(
        f"{len(MODES)} modes x {len(OPERATIONS)} kinds of save x {saves:,} timed saves in {ROUNDS} "
        f"interleaved rounds after {WARMUP_SAVES} warm-up saves each; measured in "
        f"{time.monotonic() - started:.1f} s; DEBUG off; "
        f"CONN_MAX_AGE={settings.DATABASES['default'].get('CONN_MAX_AGE')}"
        + (f"; SQLite options from config.settings: {options}" if "init_command" in options else "")
    )
    return {
        "title": title,
        **table(stats, layer),
        "verdict": verdict(stats),
        "notes": notes,
        "stats": stats,
    }


def redis_url(notes: list[str]) -> str:
    """Return REDIS_URL (or the local default) if Redis answers, else "" for in-memory."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    try:
        redis_answers(url)
    except Unavailable as exc:
        notes.append(f"{exc}; the in-memory channel layer was used")
        progress(f"{exc}; using the in-memory channel layer")
        return ""
    return url


def on_database(database: str, saves: int) -> dict[str, Any]:
    """Provide a fresh database of the given kind and the channel layer, then measure."""
    notes: list[str] = []
    if database == "sqlite":
        provide = sqlite_database()
    else:
        server_url = os.environ.get("DATABASE_URL", "")
        if not server_url.startswith(("postgres://", "postgresql://")):
            server_url = DEFAULT_POSTGRES_URL
        server = urlsplit(server_url)
        notes.append(
            f"server {server.hostname}:{server.port or 5432} (user {server.username}); "
            f"database `{BENCH_DATABASE}` created for the run and dropped after it"
        )
        provide = postgres_database(server_url)
    with provide as database_url:
        return run(database_url, redis_url(notes), saves, notes)


def main() -> None:
    """Parse the arguments, measure on the chosen database, and print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql"], required=True)
    parser.add_argument("--saves", type=int, default=2000, help="timed saves per mode and save")
    args = parser.parse_args()
    if args.saves < ROUNDS:
        parser.error(f"--saves must be at least {ROUNDS}")
    report: dict[str, Any] = {
        "benchmark": BENCHMARK,
        "about": [f"**{mode.name}**: {mode.about}" for mode in MODES],
    }
    try:
        report.update(on_database(args.database, args.saves))
    except Unavailable as exc:
        progress(f"skipped: {exc}")
        title = "SQLite" if args.database == "sqlite" else "PostgreSQL"
        report.update(title=title, skipped=str(exc))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
