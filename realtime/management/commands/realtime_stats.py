"""A one-screen summary of live connections, streams and event rates, for a terminal."""

from __future__ import annotations

import datetime as dt
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
        shown = 0
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

    def screen(self, top: int) -> str:
        from realtime.models import Connection, Event, Stream

        now = timezone.now()
        lines = [f"realtime at {now:%Y-%m-%d %H:%M:%S %Z}", ""]
        connections = list(Connection.objects.values_list("node", "transport", "subscriptions"))
        by_node = Counter((node, transport) for node, transport, _s in connections)
        users = Connection.objects.values("user").distinct().count()
        lines.append(f"live connections: {len(connections)} ({users} users)")
        for (node, transport), n in sorted(by_node.items()):
            lines.append(f"  {node:<40} {transport:<10} {n:>7}")
        stale = Connection.objects.filter(last_seen__lt=now - dt.timedelta(seconds=90)).count()
        if stale:
            lines.append(f"  {stale} row(s) not seen for 90 s (a node may have died)")
        followers = Counter(s for _n, _t, subs in connections for s in subs or [])
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
