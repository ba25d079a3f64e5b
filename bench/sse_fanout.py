"""SSE fan-out to 1,000 clients: ours vs django-eventstream, one daphne process each; print tables.

Per system: one daphne process on a free loopback port, one load client process
(bench/sse_client.py) holding every SSE connection with a session cookie of a user who may
view the project, and one writer process (bench/sse_writer.py) saving Items at stepped rates:

- ours: GET /realtime/sse/?streams=project:<pk> of config.asgi (DJANGO_SETTINGS_MODULE=
  sse_settings: config.settings with presence off, as django-eventstream has none); the
  writer saves with config.settings, so the event is logged in the save's transaction and
  published after commit on the Redis pub/sub channel layer.
- django-eventstream: GET /events/project/<pk>/ of bench/sse_eventstream_app.py; the writer
  does a plain save and `send_event` (storage in the database, Redis pub/sub to the server).

Needs Redis on the loopback (skipped with the reason otherwise). Database (`--database auto`):
a PostgreSQL database `bench_sse` (created and dropped) if PostgreSQL answers and its
max_connections allows one connection per stream (django-eventstream holds one per open
stream: its sync view and reads run in Django's per-request thread), else a SQLite file.
Each rate step sends for `--seconds`, then waits until every delivery arrived, none arrived
for QUIET seconds, or DRAIN_TIMEOUT passed; what arrives after that counts as late, what has
not arrived after the final settle as undelivered. Progress goes to stderr, the tables to
stdout. Every child process is ended in `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from services import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    Unavailable,
    free_port,
    postgres_database,
    redact,
    redis_answers,
    require_loopback,
    sqlite_database,
    stop,
)

DATABASE = "bench_sse"
SECRET_KEY = "bench-only-not-a-secret"
SYSTEMS = ("ours", "eventstream")
LABELS = {"ours": "ours (realtime SSE)", "eventstream": "django-eventstream 5.3"}
#: DJANGO_SETTINGS_MODULE, ASGI application and SSE path (with {pk}) of each system.
SERVED = {
    # config.settings with presence off (bench/sse_settings.py): eventstream has none.
    "ours": ("sse_settings", "config.asgi:application", "/realtime/sse/?streams=project:{pk}"),
    "eventstream": (
        "sse_eventstream_settings",
        "sse_eventstream_app:application",
        "/events/project/{pk}/",
    ),
}
PROBE = {"rate": 5, "seconds": 0.6}
#: Database connections PostgreSQL must allow beyond one per stream (writer, pools, others).
HEADROOM = 50
QUIET, DRAIN_TIMEOUT, SETTLE_TIMEOUT, PROBE_TIMEOUT = 2.0, 15.0, 15.0, 15.0
START_TIMEOUT, CONNECT_TIMEOUT = 30.0, 150.0
PROJECT_BASE = 700_000
MAX_CLIENTS, MAX_RATE, MAX_SECONDS = 5_000, 1_000, 30.0


def progress(message: str) -> None:
    print(f"[sse_fanout] {message}", file=sys.stderr, flush=True)


def raise_nofile(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"RLIMIT_NOFILE {soft}/{hard}"


# -- processes ----------------------------------------------------------------------------------


class Child:
    """A child process with JSON lines on stdin/stdout, ended (and reaped) by `stop()`."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.log_path = log

    def send(self, value: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(value) + "\n").encode())
        self.process.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: no answer in {timeout:.0f} s\n{self.tail()}")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.process.poll()})\n{self.tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, value: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self.send(value)
        return self.receive(timeout)

    def tail(self) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])

    def stop(self, grace: float = 5.0) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        stop(self.process, grace)
        self.log.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# -- the database and the users -----------------------------------------------------------------


def prepare(database_url: str, redis_url: str, users: int, folder: Path) -> int:
    """Migrate, create a project with `users` members and their sessions; return its pk."""
    os.environ.update(base_env(database_url, redis_url))
    os.environ["DJANGO_SETTINGS_MODULE"] = "sse_eventstream_settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.management import call_command
    from django.db import connections
    from guardian.shortcuts import assign_perm

    from board.membership import MEMBER_PERMS, add_member
    from board.models import Organization, Project

    call_command("migrate", interactive=False, verbosity=0)
    model = get_user_model()
    owner = model.objects.create_user("sse-owner", password=None)
    organization = Organization.objects.create(name="SSE bench")
    # As board.membership.create_project, with a pk of its own: Redis pub/sub channels are
    # server-wide, so another benchmark's `project:1` on the same Redis stays out of this one.
    project = Project.objects.create(
        pk=PROJECT_BASE + os.getpid() % 100_000,
        organization=organization,
        name="SSE bench",
        owner=owner,
    )
    for perm in (*MEMBER_PERMS, "board.delete_project"):
        assign_perm(perm, owner, project)
    keys = []
    for i in range(users):
        user = model.objects.create_user(f"sse-reader-{i}", password=None)
        add_member(project, user)
        session = SessionStore()
        session["_auth_user_id"] = str(user.pk)
        session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
        session["_auth_user_hash"] = user.get_session_auth_hash()
        session.create()
        keys.append(session.session_key)
    (folder / "sessions.txt").write_text("\n".join(k for k in keys if k) + "\n")
    connections.close_all()
    return int(project.pk)


def base_env(database_url: str, redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DEBUG": "0",
        "SECRET_KEY": SECRET_KEY,
        # Persistent connections in daphne's worker threads, as a production deployment has.
        "CONN_MAX_AGE": "300",
        "REALTIME_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT)]),
    }


def max_connections(server_url: str) -> int:
    """PostgreSQL's max_connections, or 0 if it does not answer."""
    import psycopg

    require_loopback(server_url)
    admin_url = urlsplit(server_url)._replace(path="/postgres").geturl()
    try:
        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            row = conn.execute("SHOW max_connections").fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row else 0


@contextlib.contextmanager
def database(choice: str, clients: int, notes: list[str]) -> Iterator[str]:
    """PostgreSQL if chosen, or (auto) if it answers and allows a connection per stream."""
    server_url = os.environ.get("DATABASE_URL", "")
    if not server_url.startswith(("postgres://", "postgresql://")):
        server_url = DEFAULT_POSTGRES_URL
    if choice != "sqlite":
        limit = max_connections(server_url)
        if choice == "postgresql" or limit >= clients + HEADROOM:
            with postgres_database(server_url, name=DATABASE) as url:
                notes.append(
                    f"database: PostgreSQL {redact(url)} (created for the run, dropped), "
                    f"max_connections={limit}"
                )
                yield url
                return
        reason = (
            "PostgreSQL is not answering"
            if not limit
            else f"PostgreSQL's max_connections={limit} is below {clients:,} streams + "
            f"{HEADROOM}, and django-eventstream holds a database connection per open stream "
            "(Django's per-request thread keeps the one its sync view opened); "
            "`--database postgresql` shows its HTTP 500s"
        )
        progress(f"{reason}; using a SQLite file")
        notes.append(f"database: a SQLite file in WAL mode (config.settings); {reason}")
    else:
        notes.append("database: a SQLite file in WAL mode (config.settings)")
    with sqlite_database() as url:
        yield url


def held_connections(pid: int, database_url: str) -> int:
    """Database connections the process holds: TCP to PostgreSQL, or open SQLite files."""
    fds = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(fd))
    if database_url.startswith("sqlite"):
        path = "/" + urlsplit(database_url).path.lstrip("/")
        return sum(1 for t in targets if t == path)
    inodes = {t[8:-1] for t in targets if t.startswith("socket:[")}
    port = f":{urlsplit(database_url).port or 5432:04X}"
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                columns = line.split()
                if columns[2].endswith(port) and columns[9] in inodes:
                    held += 1
    return held


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


# -- one system ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    system: str
    opened: int = 0
    connect_s: float = math.nan
    failures: dict[str, Any] = field(default_factory=dict)
    rss_idle_mib: float = math.nan
    rss_end_mib: float = math.nan
    threads: int = 0
    db_connections: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""


def wait_for_http(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/bench-ping/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer: it serves
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daphne did not start") from None
            time.sleep(0.2)


def drain(client: Child, expected: int, deadline: float, timeout: float) -> dict[str, Any]:
    """Poll the client until `expected` deliveries arrived, QUIET s passed without one, or
    `timeout` (or the run's deadline) passed; return its last progress."""
    last_total, last_change = -1, time.monotonic()
    end = min(time.monotonic() + timeout, max(deadline, time.monotonic() + 2.0))
    while True:
        state = client.ask({"cmd": "progress"})
        now = time.monotonic()
        if state["total"] != last_total:
            last_total, last_change = state["total"], now
        if state["total"] >= expected or now - last_change >= QUIET or now >= end:
            return state
        time.sleep(0.2)


def run_system(
    system: str, args: argparse.Namespace, env: dict[str, str], folder: Path, project: int
) -> Outcome:
    outcome = Outcome(system)
    port = free_port()
    settings, app, path = SERVED[system]
    path = path.format(pk=project)
    env = {**os.environ, **env, "DJANGO_SETTINGS_MODULE": settings}
    python = sys.executable
    children: list[Child] = []
    deadline = args.started + args.budget
    try:
        daphne = Child(
            f"{system} daphne",
            [python, "-m", "daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port), app],
            env,
            folder / f"{system}-daphne.log",
        )
        children.append(daphne)
        writer = Child(
            f"{system} writer",
            [python, str(BENCH / "sse_writer.py"), "--system", system, "--project", str(project)],
            env,
            folder / f"{system}-writer.log",
        )
        children.append(writer)
        wait_for_http(port, daphne.process, START_TIMEOUT)
        writer.receive(START_TIMEOUT)
        total_events = sum(max(1, round(r * args.seconds)) for r in args.rates) + 10
        client = Child(
            f"{system} client",
            [
                python,
                str(BENCH / "sse_client.py"),
                "--port",
                str(port),
                "--path",
                path,
                "--count",
                str(args.clients),
                "--cookies",
                str(folder / "sessions.txt"),
                "--max-events",
                str(total_events),
            ],
            env,
            folder / f"{system}-client.log",
        )
        children.append(client)
        progress(f"{system}: opening {args.clients} SSE connections on :{port}")
        ready = client.receive(CONNECT_TIMEOUT)
        outcome.opened, outcome.connect_s = ready["opened"], ready["seconds"]
        outcome.failures = ready["failures"]
        outcome.rss_idle_mib = rss_mib(daphne.process.pid)
        outcome.threads = threads(daphne.process.pid)
        outcome.db_connections = held_connections(daphne.process.pid, env["DATABASE_URL"])
        progress(
            f"{system}: {ready['opened']} open in {ready['seconds']:.1f} s"
            + (f", failures {ready['failures']}" if ready["failures"] else "")
        )
        if not outcome.opened:
            raise RuntimeError(f"no connection opened\n{daphne.tail()}")
        probe = writer.ask(PROBE, 30)
        expected = (probe["last"] - probe["first"] + 1) * outcome.opened
        got = drain(client, expected, time.monotonic() + PROBE_TIMEOUT, PROBE_TIMEOUT)
        if got["total"] < expected:
            outcome.notes.append(f"probe: {got['total']}/{expected} deliveries")
        offered = got["total"]
        steps = []
        for rate in args.rates:
            if time.monotonic() > deadline:
                outcome.notes.append(f"time budget spent: step {rate}/s skipped")
                continue
            progress(f"{system}: {rate} events/s for {args.seconds:.0f} s")
            cpu_before = cpu_seconds(daphne.process.pid), cpu_seconds(client.process.pid)
            step = writer.ask({"rate": rate, "seconds": args.seconds}, args.seconds + 60)
            offered += (step["last"] - step["first"] + 1) * outcome.opened
            state = drain(client, offered, deadline, DRAIN_TIMEOUT)
            step["daphne_cpu_s"] = cpu_seconds(daphne.process.pid) - cpu_before[0]
            step["client_cpu_s"] = cpu_seconds(client.process.pid) - cpu_before[1]
            step["drained"] = time.time()
            step["open_after"] = state["open"]
            steps.append(step)
        if steps:  # late deliveries of the last steps still count, as late
            drain(client, offered, deadline + SETTLE_TIMEOUT, SETTLE_TIMEOUT)
        report = client.ask({"cmd": "report", "steps": steps}, 60)
        outcome.rss_end_mib = rss_mib(daphne.process.pid)
        for step in report["steps"]:
            step["expected"] = (step["last"] - step["first"] + 1) * outcome.opened
        outcome.steps = report["steps"]
        if report["dropped"]:
            outcome.notes.append(f"{report['dropped']} connections closed by the server")
        if report["duplicates"]:
            outcome.notes.append(f"{report['duplicates']} duplicate deliveries (not counted)")
        client.send({"cmd": "close"})
        writer.send({"cmd": "quit"})
    except Exception as exc:  # report it and go on with the other system
        outcome.error = str(exc)
        progress(f"{system} failed: {exc}")
    finally:
        for child in reversed(children):
            child.stop()
    return outcome


# -- tables -------------------------------------------------------------------------------------


def table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, rule, *body])


def print_report(outcomes: list[Outcome], args: argparse.Namespace, notes: list[str]) -> None:
    print(f"# SSE fan-out to {args.clients:,} clients: ours vs django-eventstream\n")
    for note in notes:
        print(f"- {note}")
    print()
    columns = [
        "rate ev/s",
        "system",
        "sent ev/s",
        "offered deliveries/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "late",
        "undelivered",
        "CPU daphne / client",
    ]
    rows = []
    for rate in args.rates:
        for outcome in outcomes:
            step = next((s for s in outcome.steps if s["rate"] == rate), None)
            if step is None:
                rows.append([str(rate), LABELS[outcome.system], *["-"] * 9])
                continue
            span = max(step["last_arrival"], step["end"]) - step["start"]
            lost = step["expected"] - step["received"]
            late = step["received"] - step["in_window"]
            busy = step["drained"] - step["start"]
            rows.append(
                [
                    str(rate),
                    LABELS[outcome.system],
                    f"{step['achieved']:.1f}",
                    f"{step['achieved'] * outcome.opened:,.0f}",
                    f"{step['received'] / span:,.0f}" if step["received"] else "0",
                    f"{step['p50_ms']:,.0f}",
                    f"{step['p99_ms']:,.0f}",
                    f"{step['max_ms']:,.0f}",
                    f"{late:,} ({late / step['expected']:.1%})",
                    f"{lost:,} ({lost / step['expected']:.1%})",
                    f"{step['daphne_cpu_s'] / busy:.0%} / {step['client_cpu_s'] / busy:.0%}",
                ]
            )
    print(table(columns, rows))
    print()
    columns = [
        "system",
        "streams open",
        "time to open",
        "daphne RSS idle / end",
        "daphne threads",
        "DB connections held",
        "notes",
    ]
    rows = []
    for outcome in outcomes:
        failures = ", ".join(f"{k}: {v}" for k, v in outcome.failures.items())
        rows.append(
            [
                LABELS[outcome.system],
                f"{outcome.opened:,}/{args.clients:,}",
                f"{outcome.connect_s:.1f} s",
                f"{outcome.rss_idle_mib:.0f} / {outcome.rss_end_mib:.0f} MiB",
                str(outcome.threads),
                str(outcome.db_connections),
                "; ".join(filter(None, [outcome.error, failures, *outcome.notes])) or "-",
            ]
        )
    print(table(columns, rows))
    print(
        "\ndelivered/s = deliveries of the step's events / (last arrival - step start); "
        "latency = arrival - the writer's time.time() before the save (late deliveries "
        "included); late = arrived after the step drained (all arrived, "
        f"{QUIET:.0f} s quiet, or {DRAIN_TIMEOUT:.0f} s), i.e. during a later step or the final "
        f"settle (up to {SETTLE_TIMEOUT:.0f} s); undelivered = not arrived by the end of the "
        "run (counted as lost); CPU = process CPU time / "
        "(drained - step start), 100% = one core; threads, "
        "DB connections held (its TCP sockets to PostgreSQL, or its open descriptors of the "
        "SQLite file) and idle RSS read from /proc once every stream is open."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rates", default="20,50,100", help="events/s per step, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per step")
    parser.add_argument("--users", type=int, default=50, help="users sharing the connections")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, of: {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--database", choices=["auto", "postgresql", "sqlite"], default="auto")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run")
    parser.add_argument("--logs", help="keep the processes' logs in this folder")
    parser.add_argument(
        "--data", type=Path, help="append each system's plot point to this JSON-lines file"
    )
    args = parser.parse_args()
    args.rates = [int(r) for r in args.rates.split(",") if r.strip()]
    systems = [s for s in args.systems.split(",") if s]
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.users <= args.clients:
        parser.error(f"--clients must be 1..{MAX_CLIENTS}, --users 1..clients")
    if not args.rates or any(not 1 <= r <= MAX_RATE for r in args.rates):
        parser.error(f"--rates must be 1..{MAX_RATE}")
    if not 0.5 <= args.seconds <= MAX_SECONDS or set(systems) - set(SYSTEMS):
        parser.error(f"--seconds must be 0.5..{MAX_SECONDS}; systems: {', '.join(SYSTEMS)}")
    args.started = time.monotonic()
    notes = [raise_nofile(args.clients + 1000)]
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    try:
        redis_answers(redis_url)
    except Unavailable as exc:
        print(f"# SSE fan-out: skipped\n\n{exc}: the writer's events could not reach daphne.")
        return
    notes.append(
        f"Redis {redact(redis_url)}; {os.cpu_count()} CPUs shared by daphne, the load client, "
        "the writer, Redis and the database; one daphne process per system, run one after "
        "the other; ours with presence off (bench/sse_settings.py), as django-eventstream "
        "has none"
    )
    outcomes = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-sse-") as name,
        database(args.database, args.clients, notes) as db_url,
    ):
        folder = Path(args.logs or name)
        folder.mkdir(parents=True, exist_ok=True)
        progress("preparing the database, users and sessions")
        project = prepare(db_url, redis_url, args.users, folder)
        notes.append(
            f"{args.clients:,} connections from one asyncio client process, shared by "
            f"{args.users} users with view_project on the project; steps of {args.seconds:.0f} "
            f"s at {', '.join(map(str, args.rates))} events/s after a {PROBE['rate']}/s probe"
        )
        env = base_env(db_url, redis_url)
        for system in systems:
            outcomes.append(run_system(system, args, env, folder, project))
    notes.append(f"total run time {time.monotonic() - args.started:.0f} s")
    print_report(outcomes, args, notes)
    if args.data:
        with args.data.open("a") as out:
            for point in plot_points(outcomes, args):
                out.write(json.dumps(point) + "\n")


def plot_points(outcomes: list[Outcome], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per system: its highest delivered/s of any step and the p99 of its slowest-rate step."""
    points = []
    for outcome in outcomes:
        steps = sorted(outcome.steps, key=lambda step: step["rate"])
        if not steps:
            continue
        delivered = [
            step["received"] / (max(step["last_arrival"], step["end"]) - step["start"])
            for step in steps
            if step["received"]
        ]
        points.append(
            {
                "system": LABELS[outcome.system],
                "clients": args.clients,
                "delivered_per_s": max(delivered, default=0.0),
                "p99_ms": steps[0]["p99_ms"] if steps[0]["received"] else math.nan,
                "rate": steps[0]["rate"],
            }
        )
    return points


if __name__ == "__main__":
    main()
