"""`settings.PRESENCE`: every key optional."""

from __future__ import annotations

from typing import Any

from realtime.conf import AppSettings

DEFAULTS: dict[str, Any] = {
    # Off: no entries, no joins or leaves, no list in subscribe replies (typing still works).
    "ENABLED": True,
    # Most members listed in a subscribe reply or GET /api/presence/<stream>/ (oldest first);
    # `presenceTotal` gives the full count. Bounds the work of each subscribe in big streams.
    "MAX_LISTED": 100,
    # Where entries live: "presence.backends.memory.MemoryBackend" (one process) or
    # "presence.backends.redis.RedisBackend" (shared by nodes), and its keyword arguments.
    "BACKEND": "presence.backends.memory.MemoryBackend",
    "CONFIG": {},
    # Seconds an entry lives without being refreshed by its node.
    "TTL": 30.0,
    # Seconds between refreshes of a node's entries (TTL / 3 when None).
    "REFRESH_INTERVAL": None,
    # Seconds between sweeps for expired entries (each node sweeps; a leave is announced once).
    "SWEEP_INTERVAL": 5.0,
    # Callable (user) -> dict of display fields, or a DRF serializer class, or a dotted path.
    "USER_SERIALIZER": "presence.display.user_display",
    # Typing indicators: at most one `v1:typing.started` per user and stream per this many
    # seconds is forwarded; receivers drop the indicator after `TYPING_EXPIRES_MS`.
    "TYPING_INTERVAL": 1.0,
    "TYPING_EXPIRES_MS": 3000,
    # Seconds a join or leave may wait for the backend before it counts as failed (five times
    # this for a refresh of all the node's entries). After a failure the node's joins and
    # leaves leave the backend alone for 5 s (the refresh and a sweep repair them later), so
    # a stalled Redis costs one wait, not one per subscribe in a line.
    "BACKEND_TIMEOUT": 1.0,
}

presence_settings = AppSettings("PRESENCE", DEFAULTS)
