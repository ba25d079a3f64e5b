"""Settings of the django-eventstream side of the SSE benchmark (its daphne and its writer).

config.settings (the same apps, database, sessions and guardian permissions as ours) plus
django-eventstream: its app, the urlconf and ASGI app in bench/sse_eventstream_app.py, event
storage in the database (`DjangoModelStorage`, so channels are reliable and resumable like our
log), Redis pub/sub between the writer and the server (`EVENTSTREAM_REDIS`), and a channel
manager that lets only users with `board.view_project` read `project-<pk>`. Our pipeline is
switched off here: the writer's save is a plain save followed by `send_event`.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")

from config.settings import *  # noqa: F403
from config.settings import INSTALLED_APPS, LOGGING, REALTIME

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [*INSTALLED_APPS, "django_eventstream"]
ROOT_URLCONF = "sse_eventstream_app"
ASGI_APPLICATION = "sse_eventstream_app.application"
REALTIME = {**REALTIME, "ENABLED": False}

_redis = urlsplit(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
EVENTSTREAM_REDIS = {
    "host": _redis.hostname or "127.0.0.1",
    "port": _redis.port or 6379,
    "db": int((_redis.path or "/0").lstrip("/") or 0),
    # As for our layer: no socket timeout on the long-lived subscriber connection.
    "socket_timeout": None,
}
EVENTSTREAM_STORAGE_CLASS = "django_eventstream.storage.DjangoModelStorage"
EVENTSTREAM_CHANNELMANAGER_CLASS = "sse_eventstream_app.ProjectChannelManager"

LOGGING = {
    **LOGGING,
    "loggers": {
        "realtime": {"handlers": ["console"], "level": "WARNING"},
        "django_eventstream": {
            "handlers": ["console"],
            "level": os.environ.get("EVENTSTREAM_LOG_LEVEL", "WARNING"),
        },
    },
}
