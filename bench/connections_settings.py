"""Settings of the idle-connections benchmark: config.settings with production-like values.

Used by the benchmark's own process (fixtures) and by the daphne it starts, through
`DJANGO_SETTINGS_MODULE=connections_settings` with bench/ on `PYTHONPATH`. DATABASE_URL and
REDIS_URL come from the environment, as in config.settings; `BENCH_HEARTBEAT` sets HEARTBEAT.
"""

from __future__ import annotations

import os

os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")

from config.settings import *  # noqa: F403
from config.settings import DATABASES, REALTIME, REDIS_URL

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
# Persistent database connections in the daphne threads, as a production deployment has.
DATABASES["default"]["CONN_MAX_AGE"] = 300

# Redis pub/sub channels are server-wide (whatever the database number), and the tests use the
# same server: a prefix of this run's own keeps their events and control messages (a logout of
# their user 5 would close our user 5's sockets) and presence entries apart from ours.
PREFIX = os.environ.get("BENCH_CONNECTIONS_PREFIX", "bench-connections")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}], "prefix": PREFIX},
    }
}
PRESENCE = {  # type: ignore[assignment]
    "BACKEND": "presence.backends.redis.RedisBackend",
    "CONFIG": {"url": REDIS_URL, "prefix": f"{PREFIX}-presence"},
}
REALTIME = {**REALTIME, "HEARTBEAT": float(os.environ.get("BENCH_HEARTBEAT", "25.0"))}
