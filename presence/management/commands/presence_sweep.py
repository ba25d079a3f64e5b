"""Expire presence entries of nodes that stopped refreshing, and announce the leaves."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

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
        interval = options["interval"] or float(presence_settings.SWEEP_INTERVAL)
        if interval <= 0:
            self.stderr.write("--interval must be positive")
            raise SystemExit(2)
        started = time.monotonic()

        async def once() -> int:
            try:
                return len(await sweep())
            finally:
                await get_backend().close()

        while True:
            left = asyncio.run(once())
            self.stdout.write(f"presence sweep: {left} leave(s) announced")
            if options["once"]:
                return
            limit = options["max_runtime"]
            if limit is not None and time.monotonic() - started >= limit:
                return
            time.sleep(interval)
