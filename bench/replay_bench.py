"""Replay of 10,000 missed events to one client: the WebSocket resume against the event feed.

One daphne process (config.asgi, in-memory channel layer: nothing is live, everything comes
from the log) on a fresh SQLite file and, if it answers, a PostgreSQL database `bench_replay`
(created and dropped). The stream holds 10,000 events (written with realtime.emit_many).
Timed, from the request to the last event received, in rounds:

- WebSocket: `subscribe` with `since` = the position before the 10,000, the client answering
  the server's pings as a browser's client does (the replay is paced by them);
- event feed: `GET /api/realtime/events/` paged with `limit=500` and the returned cursor,
  one request after another (what a polling client does to catch up).

Target (the issue): the WebSocket replay of 10,000 events under 1 s. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from services import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    Unavailable,
    free_port,
    postgres_database,
    sqlite_database,
)

EVENTS = 10_000
ROUNDS = 5
TARGET_SECONDS = 1.0


def progress(message: str) -> None:
    print(f"[replay_bench] {message}", file=sys.stderr, flush=True)


def prepare(database_url: str) -> dict[str, Any]:
    """Migrate, make a user and a project with EVENTS events; return what the client needs."""
    code = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
os.environ.update(DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL={database_url!r},
                  REDIS_URL="", DEBUG="0", SECRET_KEY="bench-only-not-a-secret")
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth import get_user_model
from django.test import Client
import realtime
from board.membership import create_project
from board.models import Organization
from realtime.models import Stream
user = get_user_model().objects.create_user("replayer", password=None)
project = create_project(organization=Organization.objects.create(name="R"), name="R", owner=user)
stream = f"project:{{project.pk}}"
before = Stream.objects.get(name=stream).last_seq
for start in range(0, {EVENTS}, 1000):
    realtime.emit_many((stream, "v1:bench.tick", {{"n": n, "text": "x" * 100}})
                       for n in range(start, start + 1000))
client = Client()
client.force_login(user)
print(json.dumps({{"stream": stream, "before": before,
                   "session": client.cookies["sessionid"].value}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def websocket_replay(port: int, setup: dict[str, Any]) -> float:
    import websockets
    from websockets.typing import Origin

    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/realtime/",
        origin=Origin("http://127.0.0.1"),
        additional_headers={"Cookie": f"sessionid={setup['session']}"},
        max_size=None,
    ) as socket:
        while json.loads(await socket.recv()).get("op") != "welcome":
            pass
        started = time.perf_counter()
        await socket.send(
            json.dumps(
                {"op": "subscribe", "ref": "r", "stream": setup["stream"], "since": setup["before"]}
            )
        )
        got = 0
        while got < EVENTS:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 30))
            if frame.get("op") == "ping":
                await socket.send('{"op":"pong"}')
            elif frame.get("op") == "event":
                got += 1
        return time.perf_counter() - started


def feed_replay(port: int, setup: dict[str, Any]) -> float:
    import base64

    positions = {setup["stream"]: [setup["before"], None]}
    raw = json.dumps(positions, separators=(",", ":")).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": f"sessionid={setup['session']}"}
    got = 0
    started = time.perf_counter()
    while got < EVENTS:
        connection.request(
            "GET",
            f"/api/realtime/events/?streams={setup['stream']}&cursor={cursor}&limit=500",
            headers=headers,
        )
        body = json.loads(connection.getresponse().read())
        got += len(body["events"])
        cursor = body["cursor"]
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def measure(database_url: str, label: str) -> tuple[list[str], str]:
    progress(f"{label}: writing {EVENTS:,} events")
    setup = prepare(database_url)
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": "",
        "DEBUG": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECRET_KEY": "bench-only-not-a-secret",
        "REALTIME_LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "config.asgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/accounts/login/", timeout=1
                ).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("daphne did not start") from None
                time.sleep(0.2)
        asyncio.run(websocket_replay(port, setup))  # warm-up
        ws, feed = [], []
        for n in range(ROUNDS):
            progress(f"{label}: round {n + 1} of {ROUNDS}")
            ws.append(asyncio.run(websocket_replay(port, setup)))
            feed.append(feed_replay(port, setup))
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    best, median = min(ws), statistics.median(ws)
    verdict = "PASS" if median < TARGET_SECONDS else "MISS"
    feed_median = statistics.median(feed)
    target = f"{verdict} (target < {TARGET_SECONDS:.0f} s)"
    rows = [
        f"| {label} | WebSocket resume (`since`) | {median:.3f} | {best:.3f} "
        f"| {EVENTS / median:,.0f} | {target} |",
        f"| {label} | event feed, 500 per request | {feed_median:.3f} | {min(feed):.3f} "
        f"| {EVENTS / feed_median:,.0f} | reference |",
    ]
    line = (
        f"**{verdict}: replay of {EVENTS:,} missed events by a WebSocket resume on {label}: "
        f"median {median:.3f} s of {ROUNDS} rounds (target under {TARGET_SECONDS:.0f} s)**"
    )
    return rows, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    args = parser.parse_args()
    rows: list[str] = []
    verdicts: list[str] = []
    with sqlite_database() as url:
        found, line = measure(url, "SQLite")
        rows += found
        verdicts.append(line)
    try:
        with postgres_database(args.postgres, "bench_replay") as url:
            found, line = measure(url, "PostgreSQL")
            rows += found
            verdicts.append(line)
    except Unavailable as exc:
        progress(f"PostgreSQL skipped: {exc}")
    print(
        "\n".join(
            [
                f"# Replay: {EVENTS:,} missed events to one client",
                "",
                __doc__.split("\n\n", 1)[1].split("Progress goes")[0].strip(),
                "",
                f"{ROUNDS} rounds after a warm-up; seconds from the request to the last event.",
                "",
                "| database | how | median s | best s | events/s | verdict |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                *verdicts,
            ]
        )
    )


if __name__ == "__main__":
    main()
