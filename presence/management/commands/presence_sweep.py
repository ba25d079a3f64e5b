"""Expire presence entries of nodes that stopped refreshing, and announce the leaves."""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from presence.conf import presence_settings
from presence.tracker import get_backend, sweep


class Command(BaseCommand):
    help = (
        "Sweep expired presence entries and announce each leave once. Every server process "
        "sweeps already; run this as its own process when nodes may all be down."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="one sweep, then exit")
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="seconds between sweeps (PRESENCE['SWEEP_INTERVAL'] by default)",
        )
        parser.add_argument(
            "--max-runtime", type=float, default=None, help="stop after this many seconds"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        interval = options["interval"]
        interval = float(presence_settings.SWEEP_INTERVAL) if interval is None else interval
        if not (interval > 0 and math.isfinite(interval)):
            raise CommandError("--interval must be a positive number of seconds")
        limit = options["max_runtime"]
        if limit is not None and not limit >= 0:
            raise CommandError("--max-runtime must not be negative")
        started = time.monotonic()
        stop = threading.Event()
        sweeping = threading.Event()

        def on_signal(*_: Any) -> None:
            # Between sweeps: stop after the wait. During one: stop now, since a sweep waiting
            # on a backend that does not answer (a paused Redis) may never end by itself.
            stop.set()
            if sweeping.is_set():
                raise KeyboardInterrupt

        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.sweep_until(
                interval,
                limit,
                once=options["once"],
                started=started,
                stop=stop,
                sweeping=sweeping,
            )
        except KeyboardInterrupt:
            self.stderr.write("presence sweep: stopped during a sweep")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def sweep_until(
        self,
        interval: float,
        limit: float | None,
        *,
        once: bool,
        started: float,
        stop: Any,
        sweeping: Any,
    ) -> None:
        async def sweep_once() -> int:
            try:
                return len(await sweep())
            finally:
                await get_backend().close()

        while not stop.is_set():
            sweeping.set()
            try:
                left = asyncio.run(sweep_once())
            except Exception as exc:  # keep sweeping: the backend may come back
                if once:
                    raise CommandError(
                        f"presence sweep failed: {type(exc).__name__}: {exc}"
                    ) from exc
                self.stderr.write(f"presence sweep failed: {type(exc).__name__}: {exc}")
            else:
                self.stdout.write(f"presence sweep: {left} leave(s) announced")
            finally:
                sweeping.clear()
            if once:
                return
            if limit is not None:
                remaining = limit - (time.monotonic() - started)
                if remaining < interval:  # the next sweep would come after the limit
                    stop.wait(max(remaining, 0.0))
                    return
            stop.wait(interval)
