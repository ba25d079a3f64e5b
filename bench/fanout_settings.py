"""Settings of the fan-out benchmark: config.settings with production-like values.

Used by the benchmark's own process (the writer) and by every daphne node it starts, through
`DJANGO_SETTINGS_MODULE=fanout_settings` with bench/ on `PYTHONPATH`. DATABASE_URL and
REDIS_URL come from the environment, as in config.settings.
"""

from __future__ import annotations

import os

os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")

from config.settings import *  # noqa: F403
from config.settings import DATABASES, LOGGING, REALTIME, REDIS_URL

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
# Persistent database connections in the daphne threads, as a production deployment has;
# with CONN_MAX_AGE=0 every connect-time query would open a new PostgreSQL connection.
DATABASES["default"]["CONN_MAX_AGE"] = 300

_HOST = {"address": REDIS_URL, "socket_timeout": None}
# Redis pub/sub channels are server-wide (whatever the database number), and the tests use the
# same server: a prefix of this run's own keeps their events and control messages (a logout of
# their user 5 would close our user 5's sockets) apart from ours, both ways.
PREFIX = os.environ.get("BENCH_FANOUT_PREFIX", "bench-fanout")
CHANNEL_LAYERS = {
    # Ours: the layer config.settings uses with REDIS_URL.
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [_HOST], "prefix": PREFIX},
    },
    # Reference 1, plain Channels: the classic Redis layer with its defaults.
    "plain": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [_HOST], "prefix": PREFIX},
    },
}

# 20 subscribers share a user (the default per-user limit); the raised limit only absorbs the
# Connection rows of a previous round that are still being deleted when the next one connects.
REALTIME = {**REALTIME, "MAX_CONNECTIONS_PER_USER": 100}
# The fan-out of logged events is measured, as plain Channels does it: without presence
# (which would add a join per subscriber to every other subscriber; docs/presence.md).
PRESENCE = {"ENABLED": False}  # type: ignore[assignment]

# INFO: heartbeat timeouts too, in the node logs that fanout.py shows when sockets close.
LOGGING = {
    **LOGGING,
    "loggers": {"realtime": {"handlers": ["console"], "level": "INFO"}},
}
