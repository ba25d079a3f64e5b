"""Load client of the fan-out benchmark: many WebSocket subscribers in one asyncio process.

Every socket is a `websockets` Sans-I/O `ClientProtocol` driven by a plain asyncio protocol,
so a frame costs the parser and a regular expression, not a task and a queue. Sockets open in
batches, subscribe (or wait for the server's ready reply; --reply and --ok say which frame
that is), answer pings, and record for each event frame the writer's number and send time
found in the item title (`bench <n> <time.time()>`): latency is the receive time minus that
send time, both read with `time.time()` on this machine.

Commands arrive as JSON lines on stdin (`wait`, `report`, `close`); answers and the `ready`
line go to stdout as JSON lines; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import re
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Origin
from websockets.uri import parse_uri

TITLE = re.compile(rb"bench (\d+) (\d+\.\d+)")
# Compact or not: the plain-Channels consumer and the ceiling use json.dumps' defaults.
PING = re.compile(rb'"op":\s*"ping"')
PONG = b'{"op":"pong"}'
#: A socket is ready once a frame matching REPLY (the answer to its subscribe frame, or the
#: server's own ready frame) arrives, and refused if that frame does not match OK too; other
#: systems' replies are matched with --reply and --ok instead.
REPLY = rb'"op":\s*"reply"'
OK = rb'"ok":\s*true'
CONNECT_TIMEOUT = 60.0


def progress(message: str) -> None:
    print(f"[fanout client] {message}", file=sys.stderr, flush=True)


def answer(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


class Book:
    """What arrived: per event number, the receivers' latencies, and its send time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.counts = array("l", bytes(8 * size))
        self.latencies = [array("d") for _ in range(size)]
        self.sent = array("d", bytes(8 * size))
        self.duplicates = 0
        self.strays = 0
        self.last_arrival = 0.0  # time.monotonic() of the last event frame

    def record(self, received: bytearray, data: bytes, now: float) -> bool:
        match = TITLE.search(data)
        if match is None:
            return False
        n = int(match[1])
        if n >= self.size:
            self.strays += 1
            return True
        if received[n]:
            self.duplicates += 1
            return True
        received[n] = 1
        sent = float(match[2])
        self.counts[n] += 1
        self.latencies[n].append(now - sent)
        self.sent[n] = sent
        self.last_arrival = time.monotonic()
        return True


class Subscriber(asyncio.Protocol):
    """One WebSocket: handshake, optional subscribe frame, then event frames into the book."""

    def __init__(
        self,
        index: int,
        book: Book,
        url: str,
        cookie: str,
        subscribe: str | None,
        closed: collections.Counter[str],
        reply: re.Pattern[bytes],
        ok: re.Pattern[bytes],
    ) -> None:
        self.index = index
        self.reply = reply
        self.ok = ok
        self.book = book
        self.protocol = ClientProtocol(parse_uri(url), origin=Origin("http://127.0.0.1"))
        self.cookie = cookie
        self.subscribe = subscribe
        self.closed = closed
        self.url = url
        self.closing = False
        self.received = bytearray(book.size)
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
        now = time.time()
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                if protocol.handshake_exc is not None:
                    self.fail(f"handshake: {protocol.handshake_exc}")
                elif self.subscribe is not None:
                    protocol.send_text(self.subscribe.encode())
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                frame = bytes(event.data)
                if self.book.record(self.received, frame, now):
                    continue
                if PING.search(frame):
                    protocol.send_text(PONG)
                elif not self.ready.done() and self.reply.search(frame):
                    if self.ok.search(frame):
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
        if self.ready.done() and not self.closing:
            reason = f"closed {code}" if code is not None else "connection lost"
            self.closed[reason] += 1
            if self.closed.total() <= 10:  # name the first few sockets
                progress(f"subscriber {self.index} ({self.url}): {reason} {exc or ''}")
        self.fail(f"closed before ready ({code})")

    def close(self) -> None:
        self.closing = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self.flush()
        self.transport.close()


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.book = Book(args.max_events)
        self.subscribers: list[Subscriber] = []
        self.closed: collections.Counter[str] = collections.Counter()
        self.reply = re.compile(args.reply.encode())
        self.ok = re.compile(args.ok.encode())

    async def open_one(self, index: int, cookies: list[str]) -> Subscriber | str:
        args = self.args
        port = args.ports[index % len(args.ports)]
        url = f"ws://127.0.0.1:{port}{args.path}"
        cookie = f"sessionid={cookies[index % len(cookies)]}" if cookies else ""
        subscriber = Subscriber(
            index, self.book, url, cookie, args.subscribe, self.closed, self.reply, self.ok
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: subscriber, "127.0.0.1", port)
                await subscriber.ready
        except Exception as exc:
            subscriber.close()
            return f"{type(exc).__name__}: {exc}"[:160]
        return subscriber

    async def open_all(self) -> None:
        args = self.args
        cookies = args.cookies.read_text().split() if args.cookies else []
        started = time.monotonic()
        failures: collections.Counter[str] = collections.Counter()
        for first in range(0, args.count, args.batch):
            batch = range(first, min(args.count, first + args.batch))
            results = await asyncio.gather(*(self.open_one(i, cookies) for i in batch))
            for result in results:
                if isinstance(result, Subscriber):
                    self.subscribers.append(result)
                else:
                    failures[result] += 1
            if not self.subscribers:
                progress(f"the first {len(batch)} subscribers all failed; giving up")
                break
            if (first // args.batch) % 5 == 4 or batch[-1] == args.count - 1:
                progress(
                    f"{len(self.subscribers)}/{args.count} subscribed, {sum(failures.values())} "
                    f"failed, {time.monotonic() - started:.1f} s"
                )
        answer(
            {
                "ready": len(self.subscribers),
                "failed": sum(failures.values()),
                "failures": dict(failures.most_common(5)),
                "seconds": time.monotonic() - started,
            }
        )

    async def wait(self, first: int, last: int, limit: float, quiet: float) -> dict[str, Any]:
        """Until every subscriber has events first..last, or nothing came for `quiet` s."""
        book = self.book
        expected = len(self.subscribers) * (last - first + 1)
        started = time.monotonic()
        got = 0
        while True:
            got = sum(book.counts[first : last + 1])
            now = time.monotonic()
            if got >= expected:
                outcome = "all"
                break
            if now - started > limit:
                outcome = "timeout"
                break
            if got and now - max(book.last_arrival, started) > quiet:
                outcome = "quiet"
                break
            await asyncio.sleep(0.005)
        return {"received": got, "expected": expected, "outcome": outcome}

    def report(self, phase: dict[str, Any]) -> dict[str, Any]:
        """Statistics of one phase: events first..last, the first sent at `start`."""
        book = self.book
        first, last, start = phase["first"], phase["last"], phase["start"]
        numbers = range(first, last + 1)
        everyone = len(self.subscribers)
        latencies = sorted(x for n in numbers for x in book.latencies[n])
        received = len(latencies)
        lasts = sorted(max(book.latencies[n]) for n in numbers if book.counts[n])
        complete = sum(1 for n in numbers if book.counts[n] >= everyone)
        arrivals = [book.sent[n] + max(book.latencies[n]) for n in numbers if book.counts[n]]
        span = max(arrivals) - start if arrivals else math.nan
        short = sum(1 for s in self.subscribers if s.received[first : last + 1].count(0))
        slowest = sorted(
            ((max(book.latencies[n]), n, book.sent[n]) for n in numbers if book.counts[n]),
            reverse=True,
        )[:3]
        return {
            "name": phase["name"],
            "events": len(numbers),
            "subscribers": everyone,
            "expected": everyone * len(numbers),
            "received": received,
            "lost": everyone * len(numbers) - received,
            "subscribers_missing_events": short,
            "events_reaching_all": complete,
            "p50": percentile(latencies, 0.50),
            "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else math.nan,
            "last_p50": percentile(lasts, 0.50),
            "last_p99": percentile(lasts, 0.99),
            "span": span,
            "delivered_per_s": received / span if span > 0 else math.nan,
            # (number, time.time() of the save, seconds until its last subscriber got it)
            "slowest": [(n, sent, latency) for latency, n, sent in slowest],
        }

    async def close_all(self) -> None:
        for first in range(0, len(self.subscribers), self.args.batch):
            for subscriber in self.subscribers[first : first + self.args.batch]:
                subscriber.close()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await self.open_all()
        # The client is the measuring instrument: with 5,000 sockets a full collection takes
        # long enough to show up as latency of whichever system is measured, so collect now
        # and not again (each frame makes no lasting garbage; memory stays bounded).
        gc.collect()
        gc.freeze()
        gc.disable()
        while line := await reader.readline():
            command = json.loads(line)
            name = command["cmd"]
            if name == "wait":
                result = await self.wait(
                    command["first"], command["last"], command["limit"], command["quiet"]
                )
            elif name == "report":
                result = {"phases": [self.report(phase) for phase in command["phases"]]}
            elif name == "status":
                result = {}
            elif name == "close":
                await self.close_all()
                answer({"closed": True})
                return
            else:
                result = {"error": f"unknown command {name!r}"}
            result["duplicates"] = self.book.duplicates
            result["strays"] = self.book.strays
            result["closed"] = dict(self.closed)
            answer(result)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list (NaN if empty)."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=lambda s: [int(p) for p in s.split(",")], required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--subscribe", help="frame to send once the handshake is done")
    parser.add_argument(
        "--reply",
        default=REPLY.decode(),
        help="regex of the frame that answers the subscribe frame (or says the socket is ready)",
    )
    parser.add_argument(
        "--ok", default=OK.decode(), help="regex that frame matches when the answer is yes"
    )
    parser.add_argument("--cookies", type=Path)
    parser.add_argument("--max-events", type=int, required=True)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    asyncio.run(Client(args).serve())


if __name__ == "__main__":
    main()
