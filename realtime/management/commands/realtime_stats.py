"""A one-screen summary of live connections, streams and event rates, for a terminal."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import Counter
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Count
from django.utils import timezone


class Command(BaseCommand):
    help = "Live connections by node and transport, busiest streams, event rates, relay backlog."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--watch", type=float, default=0, help="redraw every N seconds")
        parser.add_argument(
            "--count", type=int, default=0, help="with --watch: stop after this many screens"
        )
        parser.add_argument("--top", type=int, default=10, help="streams to list (default 10)")

    def handle(self, *args: Any, **options: Any) -> None:
        if not (options["watch"] >= 0 and math.isfinite(options["watch"])):
            raise CommandError("--watch must be a number of seconds, not negative")
        if options["top"] < 1:
            raise CommandError("--top must be at least 1")
        if options["count"] < 0:
            raise CommandError("--count must not be negative")
        shown = 0
        try:
            while True:
                if options["watch"] and shown:
                    self.stdout.write("\x1b[2J\x1b[H", ending="")  # clear the terminal
                try:
                    screen = self.screen(options["top"])
                except DatabaseError as exc:
                    raise CommandError(
                        f"cannot read the realtime tables ({exc}); has `manage.py migrate` run?"
                    ) from None
                self.stdout.write(screen)
                shown += 1
                if not options["watch"] or (options["count"] and shown >= options["count"]):
                    return
                time.sleep(options["watch"])
        except KeyboardInterrupt:  # how --watch is stopped: no traceback
            return

    def screen(self, top: int) -> str:
        from realtime.conf import realtime_settings
        from realtime.models import Connection, Event, Stream

        now = timezone.now()
        lines = [f"realtime at {now:%Y-%m-%d %H:%M:%S %Z}", ""]
        by_node = (
            Connection.objects.values_list("node", "transport")
            .annotate(n=Count("pk"))
            .order_by("node", "transport")
        )
        rows = list(by_node)
        users = Connection.objects.values("user").distinct().count()
        lines.append(f"live connections: {sum(n for _n, _t, n in rows)} ({users} users)")
        for node, transport, n in rows:
            lines.append(f"  {node:<40} {transport:<10} {n:>7}")
        # A live node marks its rows seen every HEARTBEAT: two missed marks, and it may be gone.
        after = 2 * float(realtime_settings.HEARTBEAT)
        stale = Connection.objects.filter(last_seen__lt=now - dt.timedelta(seconds=after)).count()
        if stale:
            lines.append(f"  {stale} row(s) not seen for {after:g} s (a node may have died)")
        # Row by row: every socket's list of streams at once would be all of them in memory.
        subscriptions = Connection.objects.values_list("subscriptions", flat=True)
        followers = Counter(
            s for subs in subscriptions.iterator(chunk_size=500) for s in subs or []
        )
        lines += ["", f"busiest streams (of {Stream.objects.count()} in the log):"]
        for stream, n in followers.most_common(top):
            lines.append(f"  {stream:<40} {n:>7} subscriber(s)")
        if not followers:
            lines.append("  (no subscriptions)")
        minute = Event.objects.filter(timestamp__gte=now - dt.timedelta(minutes=1)).count()
        hour = Event.objects.filter(timestamp__gte=now - dt.timedelta(hours=1))
        by_type = hour.values("type").annotate(n=Count("pk")).order_by("-n")[:5]
        lines += [
            "",
            f"events: {minute / 60:.1f}/s over the last minute, {hour.count()} in the last hour",
        ]
        for row in by_type:
            lines.append(f"  {row['type']:<40} {row['n']:>7}")
        backlog = Event.objects.filter(published_at__isnull=True).count()
        lines += ["", f"relay backlog: {backlog} unpublished event(s)", ""]
        return "\n".join(lines)
