"""One notification to 10,000 users: `notify()` against the per-recipient ways; print tables.

Each database runs in a child process (`--child sqlite|postgresql`) that prints JSON; the parent
prints a Markdown table per database. PostgreSQL uses a database `bench_notify` created for the
run and dropped after it. The channel layer is channels-redis' `RedisPubSubChannelLayer` on
the local Redis when it answers (else the in-memory layer, said in the table). Variants, each
notifying the same 10,000 users once, timed from the call to the end of its transaction and
to the moment every live event has been handed to the channel layer:

- ours: `notifications.notify(users, ...)`: rows and events in batches of 1,000, published
  after commit by the realtime publisher;
- ours, one call per user: `notify(user, ...)` in a loop inside one transaction (what a host
  project would write without the bulk path: a few queries per recipient);
- plain Channels: `Notification` rows by `bulk_create`, then after commit one
  `async_to_sync(channel_layer.group_send)` per recipient (no event log, so no replay).

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from services import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    Unavailable,
    postgres_database,
    redact,
    redis_answers,
    sqlite_database,
)

DATABASE = "bench_notify"
VARIANTS = ("ours: notify(users)", "ours, one call per user", "plain Channels")


def progress(message: str) -> None:
    print(f"[notify_bulk] {message}", file=sys.stderr, flush=True)


# -- child -------------------------------------------------------------------------------------


def child(database_url: str, redis_url: str, users: int) -> dict[str, Any]:
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")
    os.environ["REALTIME_LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from notifications import notify
    from notifications.models import Notification
    from notifications.service import represent
    from realtime.publisher import publisher

    User = get_user_model()
    User.objects.bulk_create(User(username=f"n{i}") for i in range(users))
    everyone = User.objects.filter(username__startswith="n").order_by("pk")
    actor = User.objects.create(username="announcer")
    layer = get_channel_layer()
    queries = [0]

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        queries[0] += 1
        return execute(sql, params, many, context)

    def ours() -> None:
        with transaction.atomic():
            notify(everyone, "announced", actor=actor)

    def per_user() -> None:
        with transaction.atomic():
            for user in everyone.iterator():
                notify(user, "announced", actor=actor)

    def plain() -> float:
        with transaction.atomic():
            rows = Notification.objects.bulk_create(
                Notification(recipient_id=pk, verb="announced", created_at=_now())
                for pk in everyone.values_list("pk", flat=True)
            )
        committed = time.perf_counter()
        send = async_to_sync(layer.group_send)
        for row in rows:
            send(f"user_{row.recipient_id}", {"type": "notify", "data": represent(row)})
        return committed

    results = []
    for name, run in zip(VARIANTS, (ours, per_user, plain), strict=True):
        progress(f"{connection.vendor}: {name}")
        Notification.objects.all().delete()
        publisher.flush(timeout=60)
        queries[0] = 0
        shed_before = publisher.shed
        with connection.execute_wrapper(count):
            started = time.perf_counter()
            ended = run() or time.perf_counter()  # plain Channels: its commit, before the sends
            committed = ended - started
        publisher.flush(timeout=120)
        published = time.perf_counter() - started
        results.append(
            {
                "variant": name,
                "committed_s": committed,
                "published_s": published,
                "queries": queries[0],
                "rows": Notification.objects.count(),
                "shed": publisher.shed - shed_before,
            }
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sqlite_version()" if connection.vendor == "sqlite" else "SHOW server_version"
        )
        version = f"{connection.display_name} {cursor.fetchone()[0]}"
    return {
        "database": version,
        "layer": type(layer).__name__,
        "users": users,
        "results": results,
    }


def _now() -> Any:
    from django.utils import timezone

    return timezone.now()


# -- parent ------------------------------------------------------------------------------------


def table(data: dict[str, Any]) -> str:
    users = data["users"]
    lines = [
        f"## {data['database']}, {data['layer']}: one notification to {users:,} users",
        "",
        "| variant | until commit (s) | until all published (s) | notifications/s | queries "
        "| rows |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        rate = users / r["published_s"] if r["published_s"] else 0
        lines.append(
            f"| {r['variant']} | {r['committed_s']:.2f} | {r['published_s']:.2f} | {rate:,.0f} "
            f"| {r['queries']:,} | {r['rows']:,} |"
        )
    shed = sum(r["shed"] for r in data["results"])
    if shed:
        lines.append(f"\n{shed} event(s) shed by the publisher's queue (left for the relay).")
    return "\n".join(lines)


def run_child(database_url: str, redis_url: str, users: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", database_url, "--redis", redis_url]
    done = subprocess.run(
        [*command, "--users", str(users)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"notify_bulk child failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--child")
    parser.add_argument("--redis", default="")
    parser.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.redis, args.users)))
        return
    redis_url = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        redis_answers(redis_url)
    except Unavailable as exc:
        progress(f"{exc}; the in-memory channel layer is used")
        redis_url = ""
    sections = [
        "# Bulk notify: one notification to many users",
        "",
        __doc__.split("\n\n", 1)[1].split("Progress goes")[0].strip(),
        "",
    ]
    with sqlite_database() as url:
        sections.append(table(run_child(url, redis_url, args.users)))
    try:
        with postgres_database(args.postgres, DATABASE) as url:
            sections += ["", table(run_child(url, redis_url, args.users))]
    except Unavailable as exc:
        sections += ["", f"PostgreSQL skipped: {exc} ({redact(args.postgres)})"]
    print("\n".join(sections))


if __name__ == "__main__":
    main()
