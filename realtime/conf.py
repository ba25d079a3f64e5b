"""The `REALTIME` settings dict, read lazily and reloaded on `setting_changed`."""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

#: Every key is optional; docs/integration.md explains each one.
DEFAULTS: dict[str, Any] = {
    # Off: registered models log and publish nothing on save and delete (benchmarks, data
    # migrations). realtime.emit() and emit_instances() still work: they are explicit.
    "ENABLED": True,
    # Which entry of CHANNEL_LAYERS carries events.
    "CHANNEL_LAYER": "default",
    # Prefix of every channel-layer group name (`rt.project.42`).
    "GROUP_PREFIX": "rt",
    # The version stored as an event row's primary type and data, and sent to subscribers
    # that ask for no version (or for one the event does not have).
    "DEFAULT_VERSION": "v1",
    # Frames waiting to be published per event loop (one per process, plus the server's
    # loop under ASGI); past it the live publish is skipped and the relay sends them.
    "PUBLISH_QUEUE_SIZE": 10_000,
    # Seconds one channel-layer publish may take before it counts as failed.
    "PUBLISH_TIMEOUT": 5.0,
    # Seconds a hub's channel-layer group join or leave (and its channel's creation) may take,
    # its wait behind another of the same group included; past it the join fails (a socket's
    # subscribe answers internal_error, its connect closes with 4500) instead of waiting.
    "GROUP_TIMEOUT": 5.0,
    # Most events one publisher task takes from its queue at a time.
    "PUBLISH_BATCH": 500,
    # Relay: seconds between passes, how old an unpublished event must be before the relay
    # takes it (so it does not race the on_commit publish), and events per pass.
    "RELAY_INTERVAL": 1.0,
    "RELAY_GRACE": 5.0,
    "RELAY_BATCH": 500,
    # Retention: events older than this many seconds, or beyond this many per stream, are
    # pruned by `manage.py realtime_prune` (None switches a rule off).
    "RETENTION_MAX_AGE": 7 * 24 * 3600,
    "RETENTION_MAX_EVENTS": 10_000,
    "PRUNE_BATCH": 1_000,
    # Correlation id header read from requests and echoed in responses.
    "CORRELATION_HEADER": "X-Correlation-ID",
    # Stream kinds configured by settings: {"project": "app.policies.ProjectPolicy"}; kinds
    # may also be registered in code with @realtime.stream_policy("project").
    "STREAM_POLICIES": {},
    # WebSocket: seconds between server pings; a socket silent for two intervals is closed.
    "HEARTBEAT": 25.0,
    # Seconds between probes each hub sends itself through the channel layer; none back for
    # two intervals: the layer is reconnected and subscriptions resync from the log (None: off).
    "LAYER_PROBE_INTERVAL": 5.0,
    # Seconds between the hub's reads of its streams' positions in the log; a subscription
    # still behind what the previous read found resyncs from the log (None or 0: off).
    "TAIL_CHECK_INTERVAL": 15.0,
    # Largest inbound frame in bytes, and deepest JSON nesting in it.
    "MAX_FRAME_BYTES": 64 * 1024,
    "MAX_DEPTH": 32,
    # Malformed frames a socket may send before it is closed with 4400.
    "MALFORMED_LIMIT": 10,
    "MAX_SUBSCRIPTIONS": 100,
    "MAX_CONNECTIONS_PER_USER": 20,
    # Client publishes: token bucket per socket and per user (per node, or on every node
    # with PUBLISH_USER_REDIS): rate/s and burst; refusals past ABUSE_LIMIT since the last
    # accepted publish close the socket with 4429.
    "PUBLISH_RATE": 10.0,
    "PUBLISH_BURST": 20,
    # {"url": "redis://…", "prefix": "…"}: the per-user publish bucket in Redis, shared by
    # every node (the node's bucket is charged too, and decides alone when Redis fails).
    "PUBLISH_USER_REDIS": None,
    # Subscribe frames: token bucket per socket (each subscribe on a presence stream tells
    # every member; unsubscribe is free); the burst lets a page subscribe to all it shows at once.
    "SUBSCRIBE_RATE": 5.0,
    "SUBSCRIBE_BURST": 100,
    "ABUSE_LIMIT": 50,
    # Seconds between re-decisions of every subscription of a connection even when no
    # permission change was announced (one could be lost with the channel layer); None: never.
    "AUTHZ_RECHECK_INTERVAL": 300.0,
    # Bytes sent to a socket since its last pong before it counts as a slow consumer (4409).
    "MAX_UNACKED_BYTES": 4 * 1024 * 1024,
    # Events read per replay query, and live events held per subscription while it replays.
    "REPLAY_BATCH": 500,
    "REPLAY_BUFFER": 1_000,
    # Single-use WebSocket tickets: lifetime in seconds.
    "TICKET_TTL": 60,
    # DRF authentication classes the event feed, SSE and the presence list take credentials
    # by, when there is no signed-in session; None: DRF's DEFAULT_AUTHENTICATION_CLASSES.
    "HTTP_AUTHENTICATION_CLASSES": None,
    # A callable (user) -> str | None naming the connection's tenant, or its dotted path.
    "TENANT_RESOLVER": None,
    # Name of this node in Connection rows (hostname:pid by default).
    "NODE_ID": None,
    # Connection rows of a node silent for this many seconds are swept.
    "CONNECTION_SWEEP_AFTER": 90.0,
    # Seconds an Idempotency-Key's first response is kept for its retries.
    "IDEMPOTENCY_TTL": 24 * 3600,
    # Prometheus exposition: its URL path (in realtime.urls), and a bearer token that may read
    # it besides staff sessions (None: staff only).
    "METRICS_PATH": "realtime/metrics",
    # Move everything allocated before the first connection out of the cyclic garbage
    # collector's reach (gc.freeze): full collections then walk only what sockets allocate,
    # which shortens the pauses that delay a fan-out to thousands of sockets.
    "GC_FREEZE": False,
    # gc.set_threshold() for a process that serves sockets, applied before its first one; None
    # leaves Python's (700, 10, 10). The third number makes full collections, each a pause
    # that grows with the sockets held (300 ms at 2,500 in the fan-out benchmark), 100 times
    # rarer; decisions.md #24.
    "GC_THRESHOLDS": (700, 10, 1000),
    "METRICS_TOKEN": None,
}


class AppSettings:
    """Attribute access to one settings dict (e.g. `settings.REALTIME`) merged over defaults.

    Unknown keys are an error at first use; the cache is dropped when the setting changes
    (Django's `setting_changed`, as `override_settings` sends it).
    """

    def __init__(self, setting: str = "REALTIME", defaults: dict[str, Any] | None = None) -> None:
        self._setting = setting
        self._defaults = DEFAULTS if defaults is None else defaults
        self._cache: dict[str, Any] | None = None
        _all.append(self)

    def _load(self) -> dict[str, Any]:
        from django.core.exceptions import ImproperlyConfigured

        user = getattr(django_settings, self._setting, None) or {}
        if not isinstance(user, dict):
            raise ImproperlyConfigured(
                f"{self._setting} must be a dict of settings, not {type(user).__name__}."
            )
        unknown = set(user) - set(self._defaults)
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown {self._setting} setting(s): {', '.join(sorted(map(repr, unknown)))}. "
                f"Known keys: {', '.join(sorted(self._defaults))}."
            )
        return {**self._defaults, **user}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._defaults:
            raise AttributeError(f"Invalid {self._setting} setting: {name!r}")
        if self._cache is None:
            self._cache = self._load()
        return self._cache[name]

    def reload(self) -> None:
        self._cache = None


_all: list[AppSettings] = []
realtime_settings = AppSettings("REALTIME", DEFAULTS)


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    for app_settings in _all:
        if setting == app_settings._setting:
            app_settings.reload()
