"""Settings of the conditional-GET benchmark: config.settings, DEBUG off, the bench's urlconf.

`bench/http_conditional.py` sets `DJANGO_SETTINGS_MODULE=conditional_settings` with bench/ on
`sys.path`; DATABASE_URL comes from the environment as in config.settings.
"""

from __future__ import annotations

import os

os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")

from config.settings import *  # noqa: F403
from config.settings import ALLOWED_HOSTS, LOGGING

DEBUG = False
# Django's test Client sends `Host: testserver`.
ALLOWED_HOSTS = [*ALLOWED_HOSTS, "testserver"]
# config.urls (the demo's real URL stack) plus the drf-extensions viewsets beside it.
ROOT_URLCONF = "conditional_views"
LOGGING = {
    **LOGGING,
    "loggers": {"realtime": {"handlers": ["console"], "level": "WARNING"}},
}
