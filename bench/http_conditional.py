"""Conditional GET of a 100-item list: 200 vs 304, ours vs drf-extensions; print tables.

In-process, through Django's test Client and the real URL stack (middleware, session
authentication, DRF, guardian), on a fresh SQLite file and, if it answers, a PostgreSQL
database `bench_conditional` created for the run and dropped after it. Variants:

- ours: GET /api/projects/<pk>/items/ (board.api.ItemViewSet on
  realtime.conditional.RealtimeResourceMixin);
- drf-extensions' ListETAGMixin (default list key constructor) and APIListETAGMixin (the
  rows' values) on the same queryset, serializer and permission classes;
- a reference: the stack's floor (a bare 304 after DRF's authentication and permission
  classes), in bench/conditional_views.py.

Each variant is timed answering 200 (no If-None-Match) and 304 (a matching If-None-Match),
in rounds interleaved with the others after a warm-up. The target (from the issue): our 304 at
least 5x cheaper than our 200. Each database runs in a child process (`--child`) that prints
JSON; the parent prints the tables, the verdicts, the queries of our 304 and, on a miss, a
cProfile of it. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from services import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    Unavailable,
    postgres_database,
    redact,
    sqlite_database,
)

DATABASE = "bench_conditional"
TARGET_RATIO = 5.0
ROUNDS = 4
MAX_REQUESTS = 20_000
PROFILED_REQUESTS = 500
ATTRIBUTION_REQUESTS = 30
OTHER_PROJECTS = 9
VISIBLE_OTHERS = 4


@dataclass(frozen=True)
class Variant:
    name: str
    path: str
    about: str


VARIANTS = (
    Variant(
        "ours",
        "/api/projects/{pk}/items/",
        "board.api.ItemViewSet on realtime.conditional.RealtimeResourceMixin with `list_parent`: "
        "the project's existence, the user's permissions on it and the stream position from one "
        "SQL statement (realtime.conditional.parent_state), then the ETag from them and the filter",
    ),
    Variant(
        "drf-ext ListETAGMixin",
        "/bench/drf-ext/projects/{pk}/items/",
        "drf-extensions 0.8 ListETAGMixin, default list key constructor (method id, format, "
        "language, the queryset's SQL text, pagination params)",
    ),
    Variant(
        "drf-ext APIListETAGMixin",
        "/bench/drf-ext-api/projects/{pk}/items/",
        "drf-extensions APIListETAGMixin, DefaultAPIModelListKeyConstructor (count() and "
        "values_list() of every row)",
    ),
    Variant(
        "floor (no ETag work)",
        "/bench/floor/projects/{pk}/items/",
        "reference, not a product: plain DRF list for 200; any If-None-Match answered 304 right "
        "after DRF authentication and permissions (the floor of this stack)",
    ),
)
KINDS = ("200", "304")


def progress(message: str) -> None:
    print(f"[http_conditional] {message}", file=sys.stderr, flush=True)


# -- child: one database ----------------------------------------------------------------------


def setup_django(database_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "conditional_settings"
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = ""  # in-memory layer: nothing here listens
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")
    os.environ["REALTIME_LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def make_data(items: int) -> tuple[Any, Any]:
    """A reader who sees 5 of 10 projects; the measured one has `items` items (logged events)."""
    from django.contrib.auth import get_user_model

    from board.membership import add_member, create_project
    from board.models import Item, Organization
    from realtime.publisher import publisher

    users = get_user_model().objects
    owner = users.create_user("bench-owner", password=None)
    reader = users.create_user("bench-reader", password=None)
    organization = Organization.objects.create(name="Bench")
    organization.members.add(owner, reader)
    projects = [
        create_project(organization=organization, name=f"Bench {i}", owner=owner)
        for i in range(1 + OTHER_PROJECTS)
    ]
    for project in projects[: 1 + VISIBLE_OTHERS]:
        add_member(project, reader)
    target = projects[0]
    for i in range(items):  # saved one by one: the stream has its events
        Item.objects.create(project=target, title=f"item {i}", position=i)
    Item.objects.bulk_create(
        Item(project=project, title=f"other {i}", position=i)
        for project in projects[1:]
        for i in range(items)
    )
    publisher.flush(timeout=30)
    return target, reader


class Requests:
    """GETs of one variant's URL through the test Client, with or without If-None-Match."""

    def __init__(self, client: Any, url: str, items: int) -> None:
        self.client = client
        self.url = url
        first = client.get(url)
        if first.status_code != 200 or len(first.json()) != items:
            raise RuntimeError(f"{url}: {first.status_code}, expected 200 with {items} items")
        self.etag = first["ETag"]
        self.headers = {"200": {}, "304": {"HTTP_IF_NONE_MATCH": self.etag}}
        self.check("304")

    def check(self, kind: str) -> None:
        got = self.client.get(self.url, **self.headers[kind]).status_code
        if got != int(kind):
            raise RuntimeError(f"{self.url}: {got}, expected {kind}")

    def run(self, kind: str, count: int) -> tuple[list[int], int]:
        """Time `count` requests; return each one's ns and the loop's wall ns."""
        get, url, headers, want = self.client.get, self.url, self.headers[kind], int(kind)
        latencies = []
        gc.collect()
        began = time.perf_counter_ns()
        for _ in range(count):
            start = time.perf_counter_ns()
            status = get(url, **headers).status_code
            latencies.append(time.perf_counter_ns() - start)
            if status != want:
                raise RuntimeError(f"{url}: {status}, expected {want}")
        return latencies, time.perf_counter_ns() - began


def count_queries(requests: Requests, kind: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        requests.check(kind)
    return len(captured.captured_queries)


LIBRARIES = (
    ("guardian/", "guardian"),
    ("django/contrib/sessions/", "sessions"),
    ("django/contrib/auth/", "auth"),
    ("rest_framework_extensions/", "drf-extensions"),
)


def origin(stack: list[traceback.FrameSummary]) -> str:
    """Where a query comes from: the project's innermost frames and the library below them."""
    ours, library = [], ""
    for frame in reversed(stack):
        name = frame.filename
        if not library:
            library = next((label for key, label in LIBRARIES if key in name), "")
        if name.startswith(str(ROOT)) and "/.venv/" not in name and "/bench/" not in name:
            ours.append(f"{Path(name).relative_to(ROOT)}:{frame.lineno} {frame.name}()")
            if len(ours) == 2:
                break
    where = " < ".join(ours) if ours else "middleware/DRF (no project frame)"
    return f"{where}{f' [{library}]' if library else ''}"


def attribute_queries(requests: Requests, kind: str) -> list[dict[str, Any]]:
    """The queries of one request with their origin and median time over a few requests."""
    from django.db import connection

    runs: list[list[dict[str, Any]]] = []

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return execute(sql, params, many, ctx)
        finally:
            elapsed = time.perf_counter_ns() - start
            runs[-1].append({"sql": sql, "ns": elapsed, "stack": traceback.extract_stack()})

    with connection.execute_wrapper(wrapper):
        for _ in range(ATTRIBUTION_REQUESTS):
            runs.append([])
            requests.check(kind)
    last = runs[-1]
    return [
        {
            "sql": " ".join(query["sql"].split())[:160],
            "origin": origin(query["stack"]),
            "ms": statistics.median(run[i]["ns"] for run in runs if len(run) > i) / 1e6,
        }
        for i, query in enumerate(last)
    ]


#: Functions whose cumulative time the profile of our 304 reports (label, file, function).
BREAKDOWN = (
    ("whole request (test Client included)", "django/test/client.py", "request"),
    ("DRF dispatch (the view)", "rest_framework/views.py", "dispatch"),
    ("DRF initial(): authentication + permission classes", "rest_framework/views.py", "initial"),
    (
        "  SessionAuthentication: session + user rows",
        "rest_framework/authentication.py",
        "authenticate",
    ),
    ("RealtimeResourceMixin.list", "realtime/conditional.py", "list"),
    ("  ItemViewSet.check_list_permissions", "board/api.py", "check_list_permissions"),
    ("  ItemViewSet.get_permission_state", "board/api.py", "get_permission_state"),
    ("    ItemViewSet.project() (all calls)", "board/api.py", "project"),
    ("    visible_projects() (all calls)", "board/api.py", "visible_projects"),
    ("    guardian ObjectPermissionBackend.has_perm", "guardian/backends.py", "has_perm"),
    ("    guardian ObjectPermissionChecker.get_perms", "guardian/core.py", "get_perms"),
    ("  stream_positions", "realtime/conditional.py", "stream_positions"),
    ("  ItemViewSet.get_queryset (all calls)", "board/api.py", "get_queryset"),
    ("  make_etag", "realtime/conditional.py", "make_etag"),
    ("  _conditional (headers)", "realtime/conditional.py", "_conditional"),
    ("SQL compilation (all queries)", "django/db/models/sql/compiler.py", "as_sql"),
    ("QuerySet filter() building (all)", "django/db/models/query.py", "_filter_or_exclude"),
    ("database driver execute (all)", "django/db/backends/utils.py", "_execute"),
)


def short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile(requests: Requests, kind: str) -> dict[str, Any]:
    """cProfile `PROFILED_REQUESTS` requests; top functions by own and cumulative time."""
    get, url, headers = requests.client.get, requests.url, requests.headers[kind]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(PROFILED_REQUESTS):
        get(url, **headers)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = stats.stats  # type: ignore[attr-defined]
    total = max(ct for _cc, _nc, _tt, ct, _callers in entries.values())

    def top(index: int, count: int) -> list[dict[str, Any]]:
        ranked = sorted(entries.items(), key=lambda item: item[1][index], reverse=True)
        return [
            {
                "function": f"{short(file)}:{line} {func}",
                "calls_per_request": value[1] / PROFILED_REQUESTS,
                "own_ms": value[2] / PROFILED_REQUESTS * 1e3,
                "cumulative_ms": value[3] / PROFILED_REQUESTS * 1e3,
            }
            for (file, line, func), value in ranked[:count]
        ]

    breakdown = []
    for label, suffix, func in BREAKDOWN:
        found = [v for (f, _l, n), v in entries.items() if f.endswith(suffix) and n == func]
        if found:
            calls = sum(v[1] for v in found) / PROFILED_REQUESTS
            cumulative = sum(v[3] for v in found) / PROFILED_REQUESTS * 1e3
            breakdown.append({"label": label, "calls": calls, "cumulative_ms": cumulative})
    return {
        "requests": PROFILED_REQUESTS,
        "total_ms_per_request": total / PROFILED_REQUESTS * 1e3,
        "breakdown": breakdown,
        "by_cumulative": top(3, 45),
        "by_own": top(2, 25),
    }


def etag_follows_writes(runners: dict[str, Requests]) -> dict[str, bool]:
    """Whether each variant's ETag changes after an item of the list is saved."""
    from board.models import Item
    from realtime.publisher import publisher

    before = {name: r.client.get(r.url)["ETag"] for name, r in runners.items()}
    item = Item.objects.filter(title="item 0").get()
    item.title = "item 0 (changed)"
    item.save()
    publisher.flush(timeout=30)
    return {name: r.client.get(r.url)["ETag"] != before[name] for name, r in runners.items()}


def percentile(ordered: list[int], fraction: float) -> int:
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def database_label() -> str:
    import sqlite3

    from django.db import connection

    if connection.vendor == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return f"PostgreSQL {cursor.fetchone()[0]}"


def measure(database_url: str, requests: int, warmup: int, items: int, force_profile: bool) -> Any:
    setup_django(database_url)
    from django.db import connections
    from django.test import Client

    target, reader = make_data(items)
    client = Client()
    client.force_login(reader)
    runners = {v.name: Requests(client, v.path.format(pk=target.pk), items) for v in VARIANTS}
    queries = {
        name: {kind: count_queries(r, kind) for kind in KINDS} for name, r in runners.items()
    }
    progress(f"{database_label()}: warming up ({warmup} requests per variant and status)")
    for r in runners.values():
        for kind in KINDS:
            r.run(kind, warmup)
    latencies: dict[tuple[str, str], list[int]] = {(v, k): [] for v in runners for k in KINDS}
    walls = dict.fromkeys(latencies, 0)
    sizes = [requests // ROUNDS + (1 if i < requests % ROUNDS else 0) for i in range(ROUNDS)]
    for number, size in enumerate(sizes, start=1):
        progress(f"round {number}/{ROUNDS}: {size} requests per variant and status")
        for name, r in runners.items():
            for kind in KINDS:
                got, wall = r.run(kind, size)
                latencies[name, kind] += got
                walls[name, kind] += wall
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for (name, kind), values in latencies.items():
        ordered = sorted(values)
        stats.setdefault(name, {})[kind] = {
            "n": len(ordered),
            "rps": len(ordered) / (walls[name, kind] / 1e9),
            "mean_ms": sum(ordered) / len(ordered) / 1e6,
            "p50_ms": percentile(ordered, 0.50) / 1e6,
            "p99_ms": percentile(ordered, 0.99) / 1e6,
            "queries": queries[name][kind],
        }
    ours = runners["ours"]
    progress("attributing the queries of our 304 and 200")
    attributed = {kind: attribute_queries(ours, kind) for kind in KINDS}
    ratio = stats["ours"]["304"]["rps"] / stats["ours"]["200"]["rps"]
    profiled = None
    if force_profile or ratio < TARGET_RATIO:
        progress(f"profiling {PROFILED_REQUESTS} of our 304s")
        profiled = profile(ours, "304")
    follows = etag_follows_writes(runners)
    title = database_label()
    connections.close_all()
    return {
        "title": title,
        "stats": stats,
        "attributed": attributed,
        "profile": profiled,
        "etag_follows_writes": follows,
    }


def child(args: argparse.Namespace) -> None:
    if args.database == "sqlite":
        provide = sqlite_database()
    else:
        server_url = os.environ.get("DATABASE_URL", "")
        if not server_url.startswith(("postgres://", "postgresql://")):
            server_url = DEFAULT_POSTGRES_URL
        provide = postgres_database(server_url, name=DATABASE)
    try:
        with provide as database_url:
            result = measure(database_url, args.requests, args.warmup, args.items, args.profile)
    except Unavailable as exc:
        progress(f"skipped: {exc}")
        result = {"title": args.database, "skipped": str(exc)}
    print(json.dumps(result))


# -- parent: run the databases, print the tables ------------------------------------------------


def table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def report(result: dict[str, Any], items: int) -> None:
    print(f"\n## {result['title']}: GET of a {items}-item list\n")
    if "skipped" in result:
        print(f"skipped: {result['skipped']}")
        return
    stats = result["stats"]
    columns = [
        "variant",
        "200 req/s",
        "304 req/s",
        "304 cheaper by",
        "200 mean/p99 ms",
        "304 mean/p99 ms",
        "queries 200/304",
        "ETag changes on a save",
    ]
    rows = []
    for v in VARIANTS:
        s = stats[v.name]
        ok, nm = s["200"], s["304"]
        rows.append(
            [
                v.name,
                f"{ok['rps']:,.0f}",
                f"{nm['rps']:,.0f}",
                f"{nm['rps'] / ok['rps']:.2f}x",
                f"{ok['mean_ms']:.3f} / {ok['p99_ms']:.3f}",
                f"{nm['mean_ms']:.3f} / {nm['p99_ms']:.3f}",
                f"{ok['queries']:.0f} / {nm['queries']:.0f}",
                "yes" if result["etag_follows_writes"][v.name] else "NO (stale 304s)",
            ]
        )
    print(table(columns, rows))
    ratio = stats["ours"]["304"]["rps"] / stats["ours"]["200"]["rps"]
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(
        f"\n{verdict}: our 304 is {ratio:.2f}x cheaper than our 200 "
        f"({stats['ours']['304']['mean_ms']:.3f} vs {stats['ours']['200']['mean_ms']:.3f} ms "
        f"mean; target: at least {TARGET_RATIO:.0f}x)"
    )
    for kind in KINDS:
        queries = result["attributed"][kind]
        total = sum(q["ms"] for q in queries)
        mean = stats["ours"][kind]["mean_ms"]
        print(
            f"\nOur {kind}: {len(queries)} queries, {total:.3f} ms of {mean:.3f} ms "
            f"({total / mean:.0%}) in the database driver (median per query):"
        )
        for i, q in enumerate(queries, start=1):
            print(f"  {i:2}. {q['ms']:.3f} ms  {q['origin']}\n      {q['sql']}")
    profiled = result.get("profile")
    if profiled:
        print(
            f"\ncProfile of {profiled['requests']} of our 304s "
            f"({profiled['total_ms_per_request']:.3f} ms per request under the profiler); "
            "per request, where the time goes:"
        )
        for entry in profiled["breakdown"]:
            print(
                f"  {entry['cumulative_ms']:7.3f} ms  {entry['calls']:5.1f} calls  {entry['label']}"
            )
        print("\nby cumulative time:")
        for entry in profiled["by_cumulative"]:
            print(
                f"  {entry['cumulative_ms']:7.3f} ms cum {entry['own_ms']:7.3f} ms own "
                f"{entry['calls_per_request']:6.1f} calls  {entry['function']}"
            )
        print("\nby own time:")
        for entry in profiled["by_own"]:
            print(
                f"  {entry['own_ms']:7.3f} ms own {entry['calls_per_request']:7.1f} calls  "
                f"{entry['function']}"
            )


def parent(args: argparse.Namespace) -> None:
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    results = []
    for database in databases:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            "--database",
            database,
            "--requests",
            str(args.requests),
            "--warmup",
            str(args.warmup),
            "--items",
            str(args.items),
            *(["--profile"] if args.profile else []),
        ]
        progress(f"{database}: {args.requests} timed requests per variant and status")
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"the {database} run failed with exit status {done.returncode}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("# Conditional GET: 200 vs 304, ours vs drf-extensions\n")
    for v in VARIANTS:
        print(f"- **{v.name}** (`{v.path}`): {v.about}")
    server = os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL
    print(
        f"\nIn-process (django.test.Client, real urlconf and middleware, session auth, DEBUG "
        f"off, the connection kept across requests); {args.requests:,} timed requests per "
        f"variant and status in {ROUNDS} interleaved rounds after {args.warmup} warm-up "
        f"requests; req/s = requests / wall time of the loop. PostgreSQL: "
        f"{redact(urlsplit(server)._replace(path='/' + DATABASE).geturl())} (created and "
        "dropped). The reader sees 5 of 10 projects of 100 items each."
    )
    for result in results:
        report(result, args.items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--requests", type=int, default=2000, help="timed per variant and status")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="profile our 304 even on a pass")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not ROUNDS <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between {ROUNDS} and {MAX_REQUESTS}")
    if not 0 <= args.warmup <= MAX_REQUESTS or not 1 <= args.items <= 10_000:
        parser.error("--warmup or --items out of range")
    if args.child:
        if args.database == "both":
            parser.error("--child runs one database")
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
