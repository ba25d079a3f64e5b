"""Prometheus metrics of the realtime apps (prometheus-client), and their exposition.

Multi-process safe: when `PROMETHEUS_MULTIPROC_DIR` is set before the processes start (as
prometheus-client requires), every server process writes its values there and the exposition
adds them up (gauges of live connections are summed over live processes). Without it, each
process exposes its own values.

Hot paths touch these once per event per node (the hub) or once per connection, never once
per frame per subscriber.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

CONNECTIONS = Gauge(
    "realtime_connections",
    "Live connections, by transport (websocket, sse, poll: a long poll while it waits).",
    ["transport"],
    multiprocess_mode="livesum",
)
CONNECTS = Counter("realtime_connects", "Accepted connections, by transport.", ["transport"])
RECONNECTS = Counter(
    "realtime_reconnects",
    "Accepted connections whose client says it had one before and lost it (?reconnect=1), by "
    "transport.",
    ["transport"],
)
REFUSED = Counter(
    "realtime_refused_connections",
    "Refused handshakes, by close code (4401, 4403, 4429; 4500: the database failed).",
    ["code"],
)
RESUMES = Counter(
    "realtime_resumes",
    "Subscriptions resumed from a position (`since` / Last-Event-ID): clients reconnecting, "
    "or a page subscribing after a snapshot.",
    ["transport"],
)
RESETS = Counter(
    "realtime_resets",
    "Resumes the log could not serve (history pruned, another epoch), found at the start or "
    "during the replay: the client was told to refetch, by transport (websocket, sse, poll).",
    ["transport"],
)
DISCONNECTS = Counter(
    "realtime_disconnects", "Closed WebSocket connections, by close code.", ["code"]
)
PUBLISHED = Counter(
    "realtime_events_published", "Logged events handed to the channel layer (live or relay)."
)
DELIVERED = Counter(
    "realtime_events_delivered",
    "Live events handed to local subscribers (one per event per subscriber), by this node.",
)
REPLAYED = Counter(
    "realtime_events_replayed", "Logged events sent from the log by a resume.", ["transport"]
)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY = Histogram(
    "realtime_publish_to_fanout_seconds",
    "From a logged event's timestamp (its write to the log, in the writer's transaction) "
    "until this node has handed it to all of its local subscribers: the publisher's queue or "
    "the relay's wait, the channel layer, and the fan-out. Once per event per node.",
    buckets=_SECONDS,
)
PUBLISH_DELAY = Histogram(
    "realtime_publish_delay_seconds",
    "From a logged event's timestamp until the channel layer took it, by path: live (the "
    "writer's node after commit) or relay. Once per event.",
    ["path"],
    buckets=_SECONDS,
)
DROPPED = Counter(
    "realtime_dropped",
    "Frames or events dropped, by reason: rate_limit, slow_consumer, unauthorized, oversize, "
    "malformed, publish_shed (left for the relay).",
    ["reason"],
)
LAYER_STALLS = Counter(
    "realtime_layer_stalls",
    "Times this process found the channel layer silent (no probe back for two "
    "LAYER_PROBE_INTERVALs) and reconnected it.",
)
TAIL_RESYNCS = Counter(
    "realtime_tail_resyncs",
    "Subscriptions this process resynced from the log because the tail check found them "
    "behind a stream's position of the previous check (TAIL_CHECK_INTERVAL): a live event "
    "that the channel layer lost, with no later one on its stream to show the gap.",
)
UNAUTHORIZED = Counter(
    "realtime_unauthorized_attempts",
    "Refused attempts, by action: subscribe and publish on a socket, read (an SSE stream, the "
    "event feed or a presence list answered 403).",
    ["action"],
)

DROP_REASONS = {
    "rate_limited": "rate_limit",
    "frame_too_large": "oversize",
    "too_deep": "malformed",
    "invalid_json": "malformed",
    "binary_not_supported": "malformed",
    "unknown_op": "malformed",
    "invalid_frame": "malformed",
    "invalid_stream": "malformed",
    "unsupported_version": "malformed",
    "event_not_allowed": "unauthorized",
    "forbidden": "unauthorized",
}


class _Backlog:
    """`realtime_relay_backlog`: committed events not published yet (read at scrape)."""

    def collect(self) -> Any:
        from .models import Event

        family = GaugeMetricFamily(
            "realtime_relay_backlog",
            "Committed events not yet published (the relay's work; should stay near 0).",
        )
        try:
            family.add_metric([], Event.objects.filter(published_at__isnull=True).count())
        except Exception:  # the database is down: leave the gauge out rather than fail
            return []
        return [family]


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus' text format, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        forget_dead_processes(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Everything())
    registry.register(_Backlog())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live-gauge files of processes that are gone (killed, crashed, restarted).

    prometheus-client keeps a file per process; the directory is local to the host, so a pid
    that no longer runs here is dead. Returns the pids forgotten.
    """
    import re
    from pathlib import Path

    from prometheus_client import multiprocess

    dead = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        match = re.search(r"_(\d+)\.db$", path.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:  # alive, another user's
            continue
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


class _Everything:
    """This process' default registry, re-exposed next to the backlog collector."""

    def collect(self) -> Any:
        return REGISTRY.collect()
