"""Channel-layer fanout of committed events from a long-lived loop, never blocking the writer.

A save hands its frames to `publisher.submit()` from `transaction.on_commit`. The frames are
sent by one worker task per event loop: the ASGI server's own loop when the save runs in a
`sync_to_async` thread under daphne or uvicorn (so the in-memory layer and the server's Redis
connections are used as they are), otherwise a private loop on a daemon thread. Sent events
are marked published in batches; an event whose publish fails or is shed stays unpublished
and the relay (`manage.py realtime_relay`) sends it later.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextvars
import datetime as dt
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import SyncToAsync

from . import metrics
from .conf import realtime_settings
from .events import frame_field

logger = logging.getLogger("realtime.publisher")

#: The `type` of every channel-layer message carrying an event; consumers handle it in
#: `realtime_event`. The event's own type travels inside the message.
LAYER_MESSAGE_TYPE = "realtime.event"

# After a failed publish, skip the live path for this long (events go to the relay) instead
# of paying the timeout once per queued event.
_BACKOFF_SECONDS = 1.0


@dataclass(frozen=True)
class Outgoing:
    """One message ready to publish: its group, the layer message, and the log row (if any)."""

    event_pk: int | None
    stream: str
    seq: int
    group: str
    message: dict[str, Any]
    #: The database whose log holds the event (None: the router's for `Event`); its
    #: published mark goes there.
    using: str | None = None


def logged_at(message: dict[str, Any]) -> float | None:
    """The event's log time (epoch seconds, to the millisecond) read from its frame; None if
    it has none.

    Every logged event's frames carry it, live or relayed, so the latency histograms need no
    field of their own in the layer message; reading it costs about a microsecond.
    """
    try:
        stamp = frame_field(next(iter(message["frames"].values())), "timestamp")
        return None if stamp is None else dt.datetime.fromisoformat(stamp).timestamp()
    except (KeyError, StopIteration, AttributeError, TypeError, ValueError):
        return None


def event_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The `extra` of a log line about the event in a layer message: `stream`, `seq`,
    `eventId` and `correlationId` (those it has).

    The correlation id is read from the event's frame: the publisher's and the hub's tasks run
    in a context of their own (not the request's that started them), so the log formatter
    would find none, or the wrong one, in the context. Only failures log: off the hot path.
    """
    fields = {key: message.get(key) for key in ("stream", "seq", "eventId")}
    frames = message.get("frames")
    if isinstance(frames, dict) and frames:
        frame = next(iter(frames.values()))
        if isinstance(frame, str):
            fields["correlationId"] = frame_field(frame, "correlationId")
    return {key: value for key, value in fields.items() if value not in (None, "")}


class _LoopWorker:
    """The queue and the task that publish in one event loop, in submission order."""

    def __init__(self, publisher: Publisher, loop: asyncio.AbstractEventLoop) -> None:
        self.publisher = publisher
        self.loop = loop
        self.pending: collections.deque[Outgoing] = collections.deque()
        # Filled by submitting threads under the publisher's lock, emptied by take_inbox.
        self.inbox: list[Outgoing] = []
        self.scheduled = False
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.paused_until = 0.0

    def take_inbox(self) -> None:
        # Runs in the worker's loop.
        with self.publisher._lock:
            items, self.inbox = self.inbox, []
            self.scheduled = False
        if items:
            self.enqueue(items)

    def room(self) -> int:
        """How many more events fit in this worker's queue and inbox (lock held, any thread)."""
        limit = int(realtime_settings.PUBLISH_QUEUE_SIZE)
        return max(0, limit - len(self.pending) - len(self.inbox))

    def enqueue(self, items: list[Outgoing]) -> None:
        # Runs in the worker's loop. `submit` kept the inbox within the bound; a smaller
        # bound set since (a settings change) sheds what no longer fits here.
        room = max(0, int(realtime_settings.PUBLISH_QUEUE_SIZE) - len(self.pending))
        if len(items) > room:
            self.publisher._shed(items[room:], len(self.pending) + room)
            items = items[:room]
            if not items:
                return
        self.pending.extend(items)
        if self.wakeup is None:
            self.wakeup = asyncio.Event()
        if self.task is None or self.task.done():
            # A context of its own: it outlives the save whose commit started it, and must
            # not log that request's correlation id for every later event.
            self.task = self.loop.create_task(
                self.run(), name="realtime-publisher", context=contextvars.Context()
            )
        self.wakeup.set()

    async def run(self) -> None:
        assert self.wakeup is not None
        batch_size = max(1, int(realtime_settings.PUBLISH_BATCH))
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [self.pending.popleft() for _ in range(min(batch_size, len(self.pending)))]
            sent: list[Outgoing] = []
            failed = 0
            try:
                sent, failed = await self.publisher.send(batch, self)
                by_database: dict[str | None, list[int]] = {}
                for item in sent:
                    if item.event_pk is not None:
                        by_database.setdefault(item.using, []).append(item.event_pk)
                for using, pks in by_database.items():
                    self.publisher.acker.add(pks, using)
            finally:
                self.publisher._finished(len(batch), failed=failed)


def _control_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The `extra` of a log line about a control message: the `user` and `connection` it is for."""
    fields = {"user": message.get("user"), "connection": message.get("connection")}
    return {key: value for key, value in fields.items() if value is not None}


class Publisher:
    """Publishes committed events to channel-layer groups without blocking the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._workers: dict[asyncio.AbstractEventLoop, _LoopWorker] = {}
        self._private_loop: asyncio.AbstractEventLoop | None = None
        self._private_thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.acker = _Acker()
        self.submitted = 0
        self.finished = 0
        self.failed = 0
        self.shed = 0

    # -- submission --------------------------------------------------------------------

    def submit(self, items: Iterable[Outgoing]) -> None:
        """Queue events for publishing and return at once; safe from any thread.

        What does not fit in the loop's queue (`PUBLISH_QUEUE_SIZE`, the events not yet sent
        included) is shed at once: those events stay in the log for the relay.
        """
        batch = list(items)
        if not batch:
            return
        loop = self._target_loop()
        overflow: list[Outgoing] = []
        with self._lock:
            self.submitted += len(batch)
            worker = self._worker(loop)
            room = worker.room()
            if len(batch) > room:
                batch, overflow = batch[:room], batch[room:]
                queued = len(worker.pending) + len(worker.inbox)
            worker.inbox.extend(batch)
            schedule = bool(batch) and not worker.scheduled
            if schedule:
                worker.scheduled = True
        if overflow:
            self._shed(overflow, queued)
        if not schedule:
            return  # nothing new, or the loop has a drain pending that will take these too
        try:
            loop.call_soon_threadsafe(worker.take_inbox)
        except RuntimeError:  # the loop closed between lookup and call
            with self._lock:
                lost = len(worker.inbox)
                worker.inbox.clear()
            logger.warning("event loop closed; %d event(s) left for the relay", lost)
            self._finished(lost, shed=lost)

    def _shed(self, items: list[Outgoing], queued: int) -> None:
        """Count events that did not fit in a full queue as done; the relay has them."""
        events = sum(1 for item in items if item.event_pk is not None)
        if events:
            logger.warning(
                "publish queue full (%d waiting); %d event(s) left for the relay", queued, events
            )
            metrics.DROPPED.labels("publish_shed").inc(events)
        if len(items) > events:
            logger.error(
                "publish queue full (%d waiting); %d control message(s) lost (sockets pick the "
                "change up at their next authorization check)",
                queued,
                len(items) - events,
            )
        self._finished(len(items), shed=len(items))

    def send_control(self, group: str, message: dict[str, Any]) -> None:
        """Queue a message that is not a logged event (authorization changes, logout)."""
        self.submit([Outgoing(None, "", 0, group, message)])

    def publish_now(
        self,
        items: list[Outgoing],
        timeout: float | None = None,
        refused: set[str] | None = None,
    ) -> list[int]:
        """Publish on the private loop and wait; return the pks of the events that were sent.

        The streams whose messages the layer refused (not a layer failure) are added to
        `refused`, when given.
        """
        if not items:
            return []
        loop = self._ensure_private_loop()
        future = asyncio.run_coroutine_threadsafe(self.send(items, None, refused), loop)
        sent, _failed = future.result(timeout)
        return [item.event_pk for item in sent if item.event_pk is not None]

    async def send(
        self,
        items: list[Outgoing],
        worker: _LoopWorker | None,
        refused: set[str] | None = None,
    ) -> tuple[list[Outgoing], int]:
        """Send each message to its group; return (the logged events sent, failures).

        Live (`worker` given), a layer failure pauses the live path for a second. Without a
        worker (a relay pass), a layer failure ends the pass, and a stream whose message the
        layer refused gets no more tries in this pass, so its events stay in seq order.
        """
        from channels.layers import get_channel_layer

        layer = get_channel_layer(realtime_settings.CHANNEL_LAYER)
        if layer is None:
            logger.error(
                "no channel layer %r configured; %d event(s) left unpublished",
                realtime_settings.CHANNEL_LAYER,
                len(items),
            )
            return [], len(items)
        timeout = float(realtime_settings.PUBLISH_TIMEOUT)
        delay = metrics.PUBLISH_DELAY.labels("live" if worker is not None else "relay")
        sent: list[Outgoing] = []
        failed = 0
        skipped = 0
        layer_failed = False
        refused_here: set[str] = set()
        for index, item in enumerate(items):
            if worker is None and layer_failed:
                # A relay pass stops at the first layer failure instead of paying the timeout
                # for every remaining event; it tries again on its next pass.
                failed += len(items) - index
                break
            if worker is None and item.stream in refused_here:
                failed += 1
                continue
            paused = worker is not None and time.monotonic() < worker.paused_until
            if paused and item.event_pk is not None:  # control messages have no relay: try
                failed += 1
                skipped += 1
                continue
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that lands as the send completes, and then the loop can never close.
                async with asyncio.timeout(timeout):
                    await layer.group_send(item.group, item.message)
            except Exception as exc:
                failed += 1
                # Channels and the layers' serializers raise TypeError or ValueError for a
                # message they will never take (a bad group name, data they cannot pack); a
                # layer that is down or slow raises anything else (OSError, TimeoutError).
                refusal = isinstance(exc, TypeError | ValueError)
                if item.event_pk is None:
                    logger.error(
                        "control message to %s lost (%s: %s)",
                        item.group,
                        type(exc).__name__,
                        exc,
                        extra=_control_fields(item.message),
                    )
                elif refusal:
                    logger.error(
                        "the channel layer refused %s seq %d (%s: %s); left for the relay",
                        item.stream,
                        item.seq,
                        type(exc).__name__,
                        exc,
                        extra=event_fields(item.message),
                    )
                else:
                    logger.warning(
                        "publish of %s seq %d failed (%s: %s); left for the relay",
                        item.stream,
                        item.seq,
                        type(exc).__name__,
                        exc,
                        extra=event_fields(item.message),
                    )
                if refusal:
                    if item.event_pk is not None:
                        refused_here.add(item.stream)
                else:
                    layer_failed = True
                    if worker is not None:
                        worker.paused_until = time.monotonic() + _BACKOFF_SECONDS
            else:
                if item.event_pk is not None:
                    sent.append(item)
                    metrics.PUBLISHED.inc()
                    written = logged_at(item.message)
                    if written is not None:
                        delay.observe(max(0.0, time.time() - written))
        if skipped:
            logger.warning(
                "%d event(s) not published live during the failure backoff; left for the relay",
                skipped,
            )
        if refused is not None:
            refused.update(refused_here)
        return sent, failed

    def resume(self) -> None:
        """End any failure backoff now, so the next events are tried live again."""
        with self._lock:
            for worker in self._workers.values():
                worker.paused_until = 0.0

    # -- waiting -------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far was sent or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._done:
            target = self.submitted
            while self.finished < target:
                self._reap_closed_loops()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(min(remaining, 0.1))
        # The published marks are written on the ack thread; wait for them too.
        return self.acker.call(lambda: None, deadline - time.monotonic())

    def _reap_closed_loops(self) -> None:
        # Called with the lock held: events queued on a loop that has since closed will never
        # be sent from it; count them as shed (the relay has them).
        for loop in [lp for lp in self._workers if lp.is_closed()]:
            worker = self._workers.pop(loop)
            worker.pending.extend(worker.inbox)
            worker.inbox.clear()
            if worker.pending:
                logger.warning(
                    "event loop closed with %d event(s) queued; left for the relay",
                    len(worker.pending),
                )
                self.finished += len(worker.pending)
                self.shed += len(worker.pending)
                worker.pending.clear()

    def _finished(self, count: int, *, failed: int = 0, shed: int = 0) -> None:
        with self._done:
            self.finished += count
            self.failed += failed
            self.shed += shed
            self._done.notify_all()

    # -- loops ---------------------------------------------------------------------------

    def _target_loop(self) -> asyncio.AbstractEventLoop:
        self._check_fork()
        # Inside sync_to_async under an ASGI server: publish on the server's loop.
        loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
        pid = getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None)
        if loop is not None and pid == self._pid and loop.is_running():
            return loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return self._ensure_private_loop()

    def _worker(self, loop: asyncio.AbstractEventLoop) -> _LoopWorker:
        # Called with the lock held.
        self._reap_closed_loops()
        worker = self._workers.get(loop)
        if worker is None:
            worker = self._workers[loop] = _LoopWorker(self, loop)
        return worker

    def _ensure_private_loop(self) -> asyncio.AbstractEventLoop:
        self._check_fork()
        with self._lock:
            if self._private_loop is None or not self._private_thread_alive():
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="realtime-publisher", daemon=True)
                thread.start()
                started.wait(5)
                self._private_loop, self._private_thread = loop, thread
            return self._private_loop

    def _private_thread_alive(self) -> bool:
        return self._private_thread is not None and self._private_thread.is_alive()

    def _check_fork(self) -> None:
        # A forked worker must not reuse the parent's loop thread or ack thread.
        if os.getpid() != self._pid:
            self.__init__()  # type: ignore[misc]


def mark_published(pks: list[int], using: str | None = None) -> int:
    """Set `published_at` on the given events of database `using` in one UPDATE."""
    from django.db import router
    from django.utils import timezone

    from .models import Event

    events = Event.objects.using(using or router.db_for_write(Event))
    return events.filter(pk__in=pks, published_at__isnull=True).update(published_at=timezone.now())


@dataclass(frozen=True)
class _Marks:
    using: str | None
    pks: list[int]


class _Acker:
    """One thread that writes published marks, gathering them for ACK_DELAY into one UPDATE.

    It keeps its database connection open across batches (a reconnect per batch cost more
    than the publish itself) and reconnects only after an error.
    """

    ACK_DELAY = 0.1

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        # Set by `call`: someone waits, so the gathering ends now. Marks alone never wake the
        # thread while it gathers: a wake-up per published event cost the writer more than
        # the marks themselves (the threads take turns on the GIL).
        self.urgent = threading.Event()

    def _ensure(self) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="realtime-ack", daemon=True)
                self.thread.start()

    def add(self, pks: list[int], using: str | None = None) -> None:
        self._ensure()
        self.queue.put(_Marks(using, pks))

    def call(self, func: Any, timeout: float) -> bool:
        """Run `func` on the ack thread after the marks queued before it; False on timeout."""
        self._ensure()
        done = threading.Event()
        self.queue.put((func, done))
        self.urgent.set()
        return done.wait(max(0.0, timeout))

    def _run(self) -> None:
        while True:
            first = self.queue.get()  # idle until something is queued
            if not isinstance(first, tuple):
                self.urgent.wait(self.ACK_DELAY)  # gather the marks that follow
            self.urgent.clear()  # before draining: a call queued after the drain sets it again
            batch: dict[str | None, list[int]] = {}
            calls: list[tuple[Any, threading.Event]] = []
            item = first
            while True:
                if isinstance(item, tuple):
                    calls.append(item)
                else:
                    batch.setdefault(item.using, []).extend(item.pks)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            for using, pks in batch.items():
                self._mark(pks, using)
            for func, done in calls:
                try:
                    func()
                except Exception:
                    logger.exception("ack thread call failed")
                finally:
                    done.set()

    def _mark(self, pks: list[int], using: str | None) -> None:
        from django.db import DatabaseError, connections

        for attempt in (1, 2):
            try:
                mark_published(pks, using)
                return
            except DatabaseError:
                connections.close_all()  # a broken or stale connection: reconnect once
                if attempt == 2:
                    logger.exception(
                        "marking %d event(s) published failed; the relay may send them again",
                        len(pks),
                    )
            except Exception:
                logger.exception("marking %d event(s) published failed", len(pks))
                return


def close_ack_connections() -> None:
    """Close the ack thread's database connections (test teardown, process shutdown)."""
    from django.db import connections

    publisher.acker.call(connections.close_all, 10)


publisher = Publisher()


@atexit.register
def _flush_at_exit() -> None:
    # A management command or script that saved something publishes before it exits;
    # whatever does not make it in time stays in the log for the relay.
    if publisher.submitted:  # sends may be done while their published marks still wait
        publisher.flush(timeout=3.0)
