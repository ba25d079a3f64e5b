"""Delete events beyond the retention limits, in batches."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from realtime.conf import realtime_settings
from realtime.log import prune

#: Rows per DELETE at most: beyond, the statement's bound cannot be bound (2**63) or held.
MAX_BATCH = 100_000


class Command(BaseCommand):
    help = (
        "Delete published events older than --max-age seconds or beyond --max-events per "
        "stream (defaults: REALTIME['RETENTION_MAX_AGE'] and ['RETENTION_MAX_EVENTS'])."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-age", type=float, default=None, help="Seconds to keep.")
        parser.add_argument("--max-events", type=int, default=None, help="Events per stream.")
        parser.add_argument("--batch", type=int, default=None, help="Rows per DELETE.")
        parser.add_argument(
            "--database", default=None, help="Database alias holding the event log."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        max_age = options["max_age"]
        max_age = realtime_settings.RETENTION_MAX_AGE if max_age is None else max_age
        max_events = options["max_events"]
        max_events = realtime_settings.RETENTION_MAX_EVENTS if max_events is None else max_events
        if max_age is not None and (math.isnan(max_age) or max_age < 0):
            raise CommandError("--max-age must not be negative")
        if max_age is not None:
            try:
                timezone.now() - dt.timedelta(seconds=max_age)
            except OverflowError:  # before the first representable date: nothing is that old
                max_age = None
        if max_events is not None and max_events < 0:
            raise CommandError("--max-events must not be negative")
        if max_events is not None and max_events >= 2**53:  # past any column: keep them all
            max_events = None
        batch = options["batch"]
        batch = realtime_settings.PRUNE_BATCH if batch is None else batch
        if not 1 <= batch <= MAX_BATCH:
            raise CommandError(f"--batch must be from 1 to {MAX_BATCH}")

        def progress(total: int, label: str) -> None:
            if options["verbosity"] >= 2:
                self.stdout.write(f"  {total} deleted{f' ({label})' if label else ''}")

        deleted = prune(
            max_age=max_age,
            max_events=max_events,
            batch=batch,
            using=options["database"],
            progress=progress,
        )
        from realtime.tickets import prune_used

        prune_used()
        self.stdout.write(f"pruned {deleted} event(s)")
