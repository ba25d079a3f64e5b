"""Load client of the SSE benchmark: many EventSource-like connections in one asyncio process.

Each connection is a plain asyncio protocol on a raw socket sending one HTTP/1.1 GET with a
session cookie; it reads the status line, then scans the (chunked) body, up to the last
complete SSE message, for the writer's titles `bench <n> <time.time()>`: latency is the
receive time minus that send time, both `time.time()` on this machine. A connection counts
as open once its first body bytes arrived (our `retry:` line, django-eventstream's
`stream-open` event), which both servers send after subscribing it. Duplicates are counted,
not recorded twice.

Commands are JSON lines on stdin (`progress`, `report` with the steps' number ranges,
`close`); answers, and the `ready` line after connecting, are JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

TITLE = re.compile(rb"bench (\d+) (\d+\.\d+)")
CONNECT_TIMEOUT = 90.0


def progress(message: str) -> None:
    print(f"[sse client] {message}", file=sys.stderr, flush=True)


def answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


class Book:
    """What arrived: per event number, the latencies of its deliveries and the last arrival."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.latencies = [array("d") for _ in range(size + 1)]
        self.last_arrival = array("d", bytes(8 * (size + 1)))
        self.sent = array("d", bytes(8 * (size + 1)))
        self.duplicates = 0
        self.out_of_range = 0
        self.total = 0


class SSE(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.buffer = b""
        self.status = 0
        self.opened = False
        self.closed = False
        self.seen = bytearray(client.book.size + 1)
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.client.request(self))

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = self.head.split(b"\r\n", 1)[0].split()
            self.status = int(status_line[1]) if len(status_line) > 1 else -1
            data, self.head = self.head[end + 4 :], b""
            if self.status != 200:
                self.fail(f"HTTP {self.status}")
                return
        if not data:
            return
        if not self.opened:
            self.opened = True
            if not self.ready.done():
                self.ready.set_result(True)
        buffer = self.buffer + data
        cut = buffer.rfind(b"\n\n")
        if cut < 0:
            self.buffer = buffer
            return
        self.buffer = buffer[cut + 2 :]
        now = time.time()
        book = self.client.book
        seen = self.seen
        for match in TITLE.finditer(buffer, 0, cut + 2):
            n = int(match[1])
            if n > book.size:
                book.out_of_range += 1
                continue
            if seen[n]:
                book.duplicates += 1
                continue
            seen[n] = 1
            sent = float(match[2])
            book.sent[n] = sent
            book.latencies[n].append(now - sent)
            book.last_arrival[n] = now
            book.total += 1

    def fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        self.client.failures[reason] = self.client.failures.get(reason, 0) + 1
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_result(False)
            reason = f"closed before opening ({exc or 'EOF'})"
            self.client.failures[reason] = self.client.failures.get(reason, 0) + 1
        elif self.opened:
            self.client.dropped += 1


class Client:
    def __init__(self, args: argparse.Namespace, cookies: list[str]) -> None:
        self.args = args
        self.cookies = cookies
        self.book = Book(args.max_events)
        self.connections: list[SSE] = []
        self.failures: dict[str, int] = {}
        self.dropped = 0
        self.closing = False
        self.requests = 0

    def request(self, connection: SSE) -> bytes:
        # Counted per request, not by the connections appended so far: the gate opens many
        # at once, and each would take the same user (past its connection limit).
        cookie = self.cookies[self.requests % len(self.cookies)]
        self.requests += 1
        return (
            f"GET {self.args.path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.args.port}\r\n"
            "Accept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n"
            f"Cookie: sessionid={cookie}\r\n"
            "\r\n"
        ).encode()

    async def open_one(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            _transport, protocol = await loop.create_connection(
                lambda: SSE(self), "127.0.0.1", self.args.port
            )
        except OSError as exc:
            self.failures[f"connect: {exc}"] = self.failures.get(f"connect: {exc}", 0) + 1
            return False
        assert isinstance(protocol, SSE)
        self.connections.append(protocol)
        try:
            return await asyncio.wait_for(asyncio.shield(protocol.ready), CONNECT_TIMEOUT)
        except TimeoutError:
            protocol.fail("no first body bytes within the timeout")
            return False

    async def open_all(self) -> dict[str, Any]:
        started = time.time()
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one() -> bool:
            async with gate:
                return await self.open_one()

        results = await asyncio.gather(*(one() for _ in range(self.args.count)))
        opened = sum(results)
        return {
            "ready": True,
            "opened": opened,
            "failed": self.args.count - opened,
            "failures": self.failures,
            "seconds": time.time() - started,
        }

    def open_count(self) -> int:
        return sum(1 for c in self.connections if c.opened and not c.closed)

    def progress(self) -> dict[str, Any]:
        return {"total": self.book.total, "open": self.open_count(), "dropped": self.dropped}

    def report(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        book = self.book
        out = []
        for s in steps:
            numbers = range(s["first"], s["last"] + 1)
            latencies = sorted(v for n in numbers for v in book.latencies[n])
            received = len(latencies)
            last = max((book.last_arrival[n] for n in numbers), default=0.0)
            window = s.get("drained", math.inf)
            in_window = sum(
                1 for n in numbers for v in book.latencies[n] if book.sent[n] + v <= window
            )
            out.append(
                {
                    **s,
                    "received": received,
                    "in_window": in_window,
                    "last_arrival": last,
                    "p50_ms": pick(latencies, 0.50) * 1e3,
                    "p99_ms": pick(latencies, 0.99) * 1e3,
                    "max_ms": (latencies[-1] * 1e3) if latencies else math.nan,
                }
            )
        return {
            "steps": out,
            "open": self.open_count(),
            "dropped": self.dropped,
            "duplicates": book.duplicates,
            "out_of_range": book.out_of_range,
        }


def pick(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def read_commands(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any]]) -> None:
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
    loop.call_soon_threadsafe(queue.put_nowait, {"cmd": "close"})


async def run(args: argparse.Namespace, cookies: list[str]) -> None:
    client = Client(args, cookies)
    progress(f"opening {args.count} connections to :{args.port}{args.path}")
    answer(await client.open_all())
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    threading.Thread(target=read_commands, args=(loop, queue), daemon=True).start()
    while True:
        command = await queue.get()
        if command["cmd"] == "progress":
            answer(client.progress())
        elif command["cmd"] == "report":
            answer(client.report(command["steps"]))
        elif command["cmd"] == "close":
            break
    for connection in client.connections:
        if connection.transport is not None:
            connection.transport.close()
    await asyncio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--cookies", required=True, help="file of session keys, one a line")
    parser.add_argument("--max-events", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=50, help="connections opening at once")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.count + 1000), hard))
    asyncio.run(run(args, Path(args.cookies).read_text().split()))


if __name__ == "__main__":
    main()
