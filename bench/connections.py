"""Idle WebSocket connections one daphne process holds, and its memory per connection.

Per server, one daphne process on a free loopback port and one load client process (this
script with `--client`: `websockets` Sans-I/O on asyncio, every socket answering pings) that
opens the sockets in steps (1,000, 5,000, 10,000 by default, cumulative) and holds them:

- ours: `config.asgi:application` (`/ws/realtime/`) with bench/connections_settings.py:
  DEBUG off, the Redis pub/sub channel layer and the Redis presence backend, persistent
  database connections, HEARTBEAT of `--heartbeat` seconds (shorter than the default 25, so
  that pings happen while a step is held). Four sockets per user, each authenticated by its
  user's session cookie, and each sends one `subscribe` once welcomed: two to the user's own
  `user:<pk>` stream and two to one of 50 shared `project:<pk>` streams (presence on). The
  client answers every server `ping` with `pong`.
- bare daphne: bench/connections_bare.py, an `AsyncWebsocketConsumer` that accepts and does
  nothing (no authentication, channel layer or database); the client sends nothing.

Each server is warmed up first (WARMUP sockets opened and closed). RSS before is daphne's
VmRSS after that; RSS after is read once a step's sockets have all been held for HOLD_ROUNDS
heartbeat intervals. KiB per connection = (after - before) / connections still open then.
Target (the issue): 10,000 idle connections per process at no more than 40 KiB each, all
our per-connection state included. The run keeps to `--budget` seconds (450 by default): a
step that would not fit at the connect rate measured so far is skipped, and the notes say so.
Needs Redis on the loopback (ours is skipped otherwise);
PostgreSQL if it answers (database `bench_connections`, created and dropped), else SQLite.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import queue
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
    spawn,
    sqlite_database,
    stop,
)

DEFAULT_STEPS = (1000, 5000, 10_000)
SOCKETS_PER_USER = 4
PROJECTS = 50
WARMUP = 40
#: Heartbeat intervals each step is held before its RSS is read.
HOLD_ROUNDS = 2.5
#: Handshakes in flight at once.
CONCURRENCY = 50
#: Seconds the whole run may take (`--budget`): a step whose opening, at the rate measured so
#: far, would not fit is skipped (and said so); BARE_RESERVE of it is kept for the reference.
BUDGET = 450.0
BARE_RESERVE = 90.0
TARGET_CONNECTIONS = 10_000
TARGET_KIB = 40.0
# Runs in each child before it becomes the real program: die with this process (even when it
# is SIGKILLed) and raise the open-file limit to the hard limit.
PING = b'"op":"ping"'
PONG = b'{"op":"pong"}'
REPLY = b'"op":"reply"'
OK = b'"ok":true'


def progress(message: str) -> None:
    print(f"[connections] {message}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- load client (--client) -------------------------------------------------------------


class IdleSocket(asyncio.Protocol):
    """One WebSocket: handshake, an optional subscribe, then pongs for the server's pings."""

    def __init__(self, client: LoadClient, url: str, cookie: str, subscribe: bytes | None) -> None:
        from websockets.client import ClientProtocol
        from websockets.typing import Origin
        from websockets.uri import parse_uri

        self.client = client
        self.protocol = ClientProtocol(parse_uri(url), origin=Origin("http://127.0.0.1"))
        self.cookie = cookie
        self.subscribe = subscribe
        self.closing = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.protocol.connect()
        if self.cookie:
            request.headers["Cookie"] = self.cookie
        self.protocol.send_request(request)
        self.flush()

    def flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response
        from websockets.protocol import State

        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                if protocol.handshake_exc is not None:
                    self.fail(f"handshake: {protocol.handshake_exc}")
                elif self.subscribe is None:
                    self.ready.set_result(None)
                else:
                    protocol.send_text(self.subscribe)
            elif isinstance(event, Frame) and event.opcode is Opcode.PING:
                self.client.protocol_pings += 1  # answered by the protocol itself
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                frame = bytes(event.data)
                if PING in frame:
                    protocol.send_text(PONG)
                    self.client.pongs += 1
                elif not self.ready.done() and REPLY in frame:
                    if OK in frame:
                        self.ready.set_result(None)
                    else:
                        self.fail(f"refused: {frame[:200]!r}")
        self.flush()
        if protocol.state is State.CLOSED and self.transport is not None:
            self.transport.close()

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        code = self.protocol.close_code
        if self.ready.done() and not self.ready.exception() and not self.closing:
            self.client.lost[f"closed {code}" if code is not None else "connection lost"] += 1
        self.fail(f"closed before ready ({code})")

    def close(self) -> None:
        from websockets.protocol import State

        self.closing = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self.flush()
        self.transport.close()


class LoadClient:
    """Sockets of one server, opened in steps; JSON-line commands on stdin, answers on stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.port = args.port
        self.path = args.path
        self.plan: list[list[str]] = json.loads(args.plan.read_text()) if args.plan else []
        self.sockets: list[IdleSocket] = []
        self.used = 0  # plan entries used so far
        self.lost: collections.Counter[str] = collections.Counter()
        self.pongs = 0
        self.protocol_pings = 0

    async def open_one(self, index: int, gate: asyncio.Semaphore) -> IdleSocket | str:
        cookie, stream = self.plan[index % len(self.plan)] if self.plan else ("", "")
        subscribe = (
            json.dumps({"op": "subscribe", "ref": "s", "stream": stream}).encode()
            if stream
            else None
        )
        url = f"ws://127.0.0.1:{self.port}{self.path}"
        sock = IdleSocket(self, url, f"sessionid={cookie}" if cookie else "", subscribe)
        loop = asyncio.get_running_loop()
        async with gate:
            try:
                async with asyncio.timeout(120):
                    await loop.create_connection(lambda: sock, "127.0.0.1", self.port)
                    await sock.ready
            except Exception as exc:
                sock.close()
                return f"{type(exc).__name__}: {exc}"[:160]
        return sock

    async def open(self, count: int) -> dict[str, Any]:
        """Open sockets until `count` are open (those lost meanwhile are not replaced)."""
        started = time.monotonic()
        gate = asyncio.Semaphore(CONCURRENCY)
        wanted = range(self.used, self.used + count - self.open_count())
        self.used = wanted.stop
        failures: collections.Counter[str] = collections.Counter()
        for result in await asyncio.gather(*(self.open_one(i, gate) for i in wanted)):
            if isinstance(result, IdleSocket):
                self.sockets.append(result)
            else:
                failures[result] += 1
        return {
            "open": self.open_count(),
            "failed": failures.total(),
            "failures": dict(failures.most_common(3)),
            "seconds": time.monotonic() - started,
        }

    def open_count(self) -> int:
        return sum(1 for s in self.sockets if s.transport and not s.transport.is_closing())

    async def drop(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        await asyncio.sleep(0.5)
        self.lost.clear()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            result: dict[str, Any] = {}
            if command["cmd"] == "open":
                result = await self.open(command["count"])
            elif command["cmd"] == "drop":
                await self.drop()
            elif command["cmd"] == "close":
                await self.drop()
                answer({"closed": True})
                return
            result.update(
                open=self.open_count(),
                lost=dict(self.lost),
                pongs=self.pongs,
                protocol_pings=self.protocol_pings,
            )
            answer(result)


def answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def client_main(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(LoadClient(args).serve())


# -- processes ---------------------------------------------------------------------------


class Client:
    """The load client process, driven by JSON lines."""

    def __init__(self, argv: list[str], env: dict[str, str], stack: contextlib.ExitStack) -> None:
        self.process = spawn(
            [__file__, "--client", *argv],
            env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        stack.callback(stop, self.process)
        stack.callback(self.close)
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def command(self, seconds: float, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        try:
            line = self.lines.get(timeout=seconds)
        except queue.Empty:
            raise RuntimeError(f"load client silent for {seconds:.0f} s") from None
        if line is None:
            raise RuntimeError(f"load client exited ({self.process.wait(5)})")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, OSError):
                self.command(60, cmd="close")


def start_server(app: str, env: dict[str, str], log: Path, stack: contextlib.ExitStack) -> Any:
    port = free_port()
    argv = ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "-v", "0"]
    # The flood of handshakes queues; daphne's 5 s default would drop the last ones.
    argv += ["--websocket_connect_timeout", "120", app]
    with open(log, "wb") as out:
        process = spawn(argv, env, stdout=out, stderr=subprocess.STDOUT)
    stack.callback(stop, process)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return process, port
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"daphne ({app}) did not start:\n{tail}")
        time.sleep(0.1)


# -- fixtures ----------------------------------------------------------------------------


def setup_django(database_url: str, redis_url: str, prefix: str, heartbeat: float) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="connections_settings",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        BENCH_CONNECTIONS_PREFIX=prefix,
        BENCH_HEARTBEAT=str(heartbeat),
    )
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def make_plan(sockets: int, plan_file: Path) -> None:
    """Users (SOCKETS_PER_USER sockets each) with sessions, PROJECTS projects they may view,
    and per socket its session key and stream, written to `plan_file` as JSON."""
    import datetime as dt

    from django.conf import settings
    from django.contrib.auth import (
        BACKEND_SESSION_KEY,
        HASH_SESSION_KEY,
        SESSION_KEY,
        get_user_model,
    )
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session
    from django.utils import timezone
    from guardian.shortcuts import assign_perm

    from board.membership import create_project
    from board.models import Organization

    users_model = get_user_model()
    count = -(-sockets // SOCKETS_PER_USER)
    users_model.objects.bulk_create(users_model(username=f"idle-{i}") for i in range(count))
    users = list(users_model.objects.filter(username__startswith="idle-").order_by("pk"))
    organization = Organization.objects.create(name="Idle connections")
    project_count = min(PROJECTS, len(users))  # a small run has fewer users than projects
    projects = [
        create_project(organization=organization, name=f"Idle {n}", owner=users[n])
        for n in range(project_count)
    ]
    for n, project in enumerate(projects):
        assign_perm("board.view_project", users[n::project_count], project)
    expires = timezone.now() + dt.timedelta(days=1)
    store = SessionStore()
    keys = [secrets.token_hex(16) for _ in users]
    Session.objects.bulk_create(
        Session(
            session_key=key,
            expire_date=expires,
            session_data=store.encode(
                {
                    SESSION_KEY: str(user.pk),
                    BACKEND_SESSION_KEY: settings.AUTHENTICATION_BACKENDS[0],
                    HASH_SESSION_KEY: user.get_session_auth_hash(),
                }
            ),
        )
        for user, key in zip(users, keys, strict=True)
    )
    plan = []
    for i in range(sockets):
        n = i // SOCKETS_PER_USER
        own, shared = f"user:{users[n].pk}", f"project:{projects[n % len(projects)].pk}"
        plan.append([keys[n], own if i % 2 == 0 else shared])
    plan_file.write_text(json.dumps(plan))


# -- measurement -------------------------------------------------------------------------


def measure_server(
    name: str,
    app: str,
    client_args: list[str],
    steps: list[int],
    hold: float,
    env: dict[str, str],
    folder: Path,
    deadline: float,
    notes: list[str],
) -> list[dict[str, Any]]:
    """Open and hold each step's sockets against one daphne, by `deadline`; a row per step."""
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        server, port = start_server(app, env, folder / f"{name.split()[0]}.log", stack)
        client = Client(["--port", str(port), *client_args], env, stack)
        warm = client.command(120, cmd="open", count=WARMUP)
        if warm["open"] < WARMUP:
            raise RuntimeError(f"{name}: warm-up failed: {warm}")
        client.command(60, cmd="drop")
        time.sleep(2.0)
        before = rss_kib(server.pid)
        progress(f"{name}: RSS {before:,} KiB after a warm-up of {WARMUP} sockets")
        opened_total, open_seconds = 0, 0.0
        for count in steps:
            now = time.monotonic()
            if opened_total:  # the connect rate slows as sockets add up: a 25% margin
                expected = (count - rows[-1]["held"]) * open_seconds / opened_total * 1.25
                if now + expected + hold > deadline:
                    notes.append(
                        f"{name}: {count:,} not measured: at {opened_total / open_seconds:.0f} "
                        f"connections/s it would not fit in the time budget (`--budget`)."
                    )
                    progress(f"{name}: skipping {count:,} (time budget)")
                    break
            opened = client.command(max(60.0, deadline - now + 60), cmd="open", count=count)
            opened_total += count - (rows[-1]["held"] if rows else 0)
            open_seconds += opened["seconds"]
            progress(
                f"{name}: {opened['open']:,}/{count:,} open in {opened['seconds']:.1f} s"
                + (f", {opened['failed']} failed: {opened['failures']}" if opened["failed"] else "")
                + f"; holding {hold:.1f} s"
            )
            pongs = opened["pongs"]
            time.sleep(hold)
            status = client.command(60, cmd="status")
            after = rss_kib(server.pid)
            held = status["open"]
            rows.append(
                {
                    "server": name,
                    "count": count,
                    "held": held,
                    "before": before,
                    "after": after,
                    "per_connection": (after - before) / held if held else float("nan"),
                    "open_seconds": opened["seconds"],
                    "pongs": status["pongs"] - pongs,
                    "lost": status["lost"],
                }
            )
            progress(
                f"{name}: {held:,} held, RSS {after:,} KiB, "
                f"{rows[-1]['per_connection']:.1f} KiB per connection, "
                f"{status['pongs'] - pongs:,} pings answered while held"
            )
            if held < count:
                progress(f"{name}: stopping here")
                break
        if server.poll() is not None:
            raise RuntimeError(f"{name}: daphne exited with {server.returncode}")
    return rows


def verdict(row: dict[str, Any]) -> str:
    if row["server"] != "ours":
        return "reference"
    kib = row["per_connection"]
    if row["held"] < row["count"]:
        return f"MISS ({row['count'] - row['held']:,} of {row['count']:,} not held)"
    if kib > TARGET_KIB:
        return f"MISS ({kib:.1f} KiB > {TARGET_KIB:.0f})"
    if row["count"] < TARGET_CONNECTIONS:
        return f"PASS at this step (≤ {TARGET_KIB:.0f} KiB)"
    return f"PASS (≤ {TARGET_KIB:.0f} KiB at {TARGET_CONNECTIONS:,})"


def table(rows: list[dict[str, Any]], notes: list[str], heartbeat: float, hold: float) -> str:
    lines = [
        "# Idle connections per daphne process",
        "",
        __doc__.split("\n\n", 1)[1].split("Progress goes")[0].strip(),
        "",
        f"HEARTBEAT {heartbeat:g} s; each step held {hold:g} s before its RSS is read.",
        "",
        "| server | connections held | RSS before | RSS after | KiB per connection "
        "| target verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['held']:,} of {row['count']:,} "
            f"| {row['before'] / 1024:,.1f} MiB | {row['after'] / 1024:,.1f} MiB "
            f"| {row['per_connection']:.1f} | {verdict(row)} |"
        )
    ours = [row for row in rows if row["server"] == "ours"]
    if ours:
        top = max(ours, key=lambda row: row["count"])
        passed = top["count"] >= TARGET_CONNECTIONS and verdict(top).startswith("PASS")
        lines += [
            "",
            f"**{'PASS' if passed else 'MISS'}: {top['held']:,} of {top['count']:,} idle "
            f"connections held by one daphne process at {top['per_connection']:.1f} KiB each "
            f"(target: {TARGET_CONNECTIONS:,} at {TARGET_KIB:.0f} KiB or less)**",
        ]
    lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


@contextlib.contextmanager
def database(choice: str, postgres_url: str) -> Iterator[str]:
    if choice in ("auto", "postgresql"):
        try:
            with postgres_database(postgres_url, "bench_connections") as url:
                yield url
            return
        except Unavailable as exc:
            if choice == "postgresql":
                raise
            progress(f"{exc}; using SQLite")
    with sqlite_database() as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="/ws/realtime/", help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--steps",
        type=lambda s: [int(n) for n in s.split(",")],
        default=list(DEFAULT_STEPS),
        help="connection counts, comma-separated (cumulative)",
    )
    parser.add_argument("--heartbeat", type=float, default=5.0, help="ours: HEARTBEAT seconds")
    parser.add_argument("--database", choices=("auto", "sqlite", "postgresql"), default="auto")
    parser.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    parser.add_argument("--redis", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    started = time.monotonic()
    notes: list[str] = []
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    steps = [n for n in args.steps if n + 1000 <= hard]
    if steps != args.steps:
        notes.append(f"Steps above {hard - 1000:,} skipped: the open-file hard limit is {hard:,}.")
    hold = HOLD_ROUNDS * args.heartbeat
    rows: list[dict[str, Any]] = []
    prefix = f"bench-connections-{os.getpid()}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(BENCH), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
        "BENCH_CONNECTIONS_PREFIX": prefix,
        "BENCH_HEARTBEAT": str(args.heartbeat),
        "REALTIME_LOG_LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as tmp:
        folder = Path(tmp)
        try:
            redis_answers(args.redis)
        except Unavailable as exc:
            progress(f"ours skipped: {exc}")
            notes.append(f"ours not measured: {exc}")
        else:
            with database(args.database, args.postgres) as database_url:
                setup_django(database_url, args.redis, prefix, args.heartbeat)
                from django.db import connection, connections

                progress(f"{max(steps):,} sockets' users, sessions and projects")
                make_plan(max(steps), folder / "plan.json")
                vendor = connection.vendor
                connections.close_all()
                ours_env = {
                    **env,
                    "DJANGO_SETTINGS_MODULE": "connections_settings",
                    "DATABASE_URL": database_url,
                    "REDIS_URL": args.redis,
                }
                rows += measure_server(
                    "ours",
                    "config.asgi:application",
                    ["--path", "/ws/realtime/", "--plan", str(folder / "plan.json")],
                    steps,
                    hold,
                    ours_env,
                    folder,
                    started + args.budget - BARE_RESERVE,
                    notes,
                )
            notes.append(
                f"ours: {vendor} database, Redis at {redact(args.redis)} (channel layer and "
                f"presence under the prefix `{prefix}`); Redis's and the database's memory "
                "are not counted."
            )
        rows += measure_server(
            "bare daphne",
            "connections_bare:application",
            ["--path", "/ws/idle/"],
            steps,
            hold,
            {k: v for k, v in env.items() if k != "DJANGO_SETTINGS_MODULE"},
            folder,
            started + args.budget,
            notes,
        )
    ours = [row for row in rows if row["server"] == "ours"]
    if ours:
        notes.append(
            "ours, server pings answered while each step was held: "
            + ", ".join(f"{row['pongs']:,} at {row['count']:,}" for row in ours)
            + "; bare daphne sends none (daphne's own protocol pings, every 20 s, are answered "
            "by the client's WebSocket library for both)."
        )
    at_target = [row for row in ours if row["count"] >= TARGET_CONNECTIONS]
    notes.append(
        f"Target: {verdict(at_target[-1])}: {at_target[-1]['per_connection']:.1f} KiB per "
        f"connection with {at_target[-1]['held']:,} held."
        if at_target
        else f"Target: NOT MEASURED (no step of {TARGET_CONNECTIONS:,} for ours)."
    )
    notes.append(
        f"Measured in {time.monotonic() - started:.0f} s; the load client runs in its own "
        "process, so its memory is not counted; all traffic on 127.0.0.1."
    )
    print(table(rows, notes, args.heartbeat, hold))


if __name__ == "__main__":
    main()
