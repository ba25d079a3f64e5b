"""Publish events that were committed but never published."""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from realtime.conf import realtime_settings
from realtime.context import correlation
from realtime.log import relay_once

#: Bounds of --batch and --grace: beyond them a pass's query or its cutoff cannot be made.
MAX_BATCH = 100_000
MAX_GRACE = 365 * 24 * 3600.0


class Command(BaseCommand):
    help = (
        "Publish events that were committed but not published (the process died between "
        "commit and publish, or the channel layer was down). Runs until stopped, or once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Do one pass of at most --batch events and exit (1 if it failed).",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="Seconds between passes (REALTIME['RELAY_INTERVAL']; 0.05 to 60).",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="Only take events older than this many seconds (REALTIME['RELAY_GRACE']).",
        )
        parser.add_argument(
            "--batch", type=int, default=None, help="Events per pass (REALTIME['RELAY_BATCH'])."
        )
        parser.add_argument(
            "--database",
            default=None,
            help="Database alias holding the event log (the router's choice by default).",
        )
        parser.add_argument(
            "--max-passes",
            type=int,
            default=None,
            help="Stop after this many passes (for supervised runs and tests).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        interval = options["interval"]
        interval = realtime_settings.RELAY_INTERVAL if interval is None else interval
        if math.isnan(float(interval)):
            raise CommandError("--interval must be a number of seconds")
        interval = min(max(float(interval), 0.05), 60.0)
        batch = options["batch"]
        batch = realtime_settings.RELAY_BATCH if batch is None else batch
        if not 1 <= batch <= MAX_BATCH:
            raise CommandError(f"--batch must be from 1 to {MAX_BATCH}")
        grace = options["grace"]
        if grace is not None and not (grace >= 0 and math.isfinite(grace)):  # NaN too
            raise CommandError("--grace must be a finite number of seconds, not negative")
        if grace is not None and grace > MAX_GRACE:
            raise CommandError(f"--grace must be at most {MAX_GRACE:.0f} seconds (a year)")
        if options["max_passes"] is not None and options["max_passes"] < 1:
            raise CommandError("--max-passes must be at least 1")
        from channels.layers import InMemoryChannelLayer, get_channel_layer

        if isinstance(get_channel_layer(realtime_settings.CHANNEL_LAYER), InMemoryChannelLayer):
            self.stderr.write(
                "warning: the channel layer is in-memory, so events the relay publishes reach "
                "only this process; use a shared layer (Redis) with the relay"
            )
        stop = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            self._run(stop, options, interval, batch)
        finally:
            # call_command() in a process of its own (a scheduler, a worker): its handlers
            # again, or SIGTERM and Ctrl-C would only set this finished run's event.
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(
        self, stop: threading.Event, options: dict[str, Any], interval: float, batch: int
    ) -> None:
        passes = 0
        max_passes = 1 if options["once"] else options["max_passes"]
        verbose = options["verbosity"] >= 1
        while not stop.is_set():
            started = time.monotonic()
            try:
                # A correlation id per pass ties its lines together; a line about one event
                # carries that event's own id instead (the writer's, from its frame).
                with correlation():
                    result = relay_once(
                        grace=options["grace"], limit=batch, using=options["database"]
                    )
            except Exception as exc:  # keep running; the database may come back
                if options["once"]:
                    raise CommandError(f"relay pass failed: {type(exc).__name__}: {exc}") from exc
                self.stderr.write(f"relay pass failed: {type(exc).__name__}: {exc}")
                result = None
            passes += 1
            if result is not None and (result.found or options["once"]) and verbose:
                self.stdout.write(
                    f"relay: {result.published} published, {result.failed} failed "
                    f"of {result.found} pending ({time.monotonic() - started:.3f}s)"
                )
            if options["once"] and result is not None and result.failed:
                raise CommandError(
                    f"{result.failed} event(s) could not be published; they stay in the log "
                    "for the next pass"
                )
            if max_passes is not None and passes >= max_passes:
                break
            # A full batch that all went out means more are waiting: go again at once. After
            # a failure, wait: the layer is probably down.
            if result is None or result.failed or result.found < batch:
                stop.wait(interval)
