"""Settings of the demo project; production values come from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if not value:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = env_bool("DEBUG", True)
# The development default is only usable with DEBUG on; production must set SECRET_KEY.
SECRET_KEY = os.environ.get("SECRET_KEY") or (
    "dev-insecure-key-do-not-use-in-production" if DEBUG else ""
)
if not SECRET_KEY:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
# TLS (`check --deploy` refuses a release without it, realtime.E041/E042): cookies only over
# https, and either this process redirects to https or a proxy that ends TLS says so in
# X-Forwarded-Proto (set TLS_PROXY only behind a proxy that overwrites that header).
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
if env_bool("TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # DRF's tokens, so a client without cookies can get a WebSocket ticket with
    # `Authorization: Token <key>` (docs/integration.md, "WebSocket tickets").
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "guardian",
    "channels",
    "realtime",
    "notifications",
    "presence",
    "board",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "realtime.middleware.CorrelationIdMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("CONN_MAX_AGE", "0")),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory, so the publisher's ack thread sees what tests commit.
    # One file per test process, so two runs in one checkout do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / f".test-db-{os.getpid()}.sqlite3")}
    # WAL lets readers and the writer overlap; IMMEDIATE takes the write lock at BEGIN, so
    # two threads wait for each other (up to `timeout`) instead of failing with "locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

REDIS_URL = os.environ.get("REDIS_URL", "")
# This site's names in a Redis it shares with others (a staging beside a production, the
# workers of a parallel test run): Redis pub/sub ignores the database number of the URL, so
# only a prefix of its own keeps another site's events off this one's subscribers.
REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "").strip()
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            # redis-py's default 5 s socket timeout would drop idle subscriber sockets.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
                "prefix": f"{REDIS_PREFIX}.asgi" if REDIS_PREFIX else "asgi",
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Presence: shared by every node through Redis when there is one; else in this process.
PRESENCE = (
    {
        "BACKEND": "presence.backends.redis.RedisBackend",
        "CONFIG": {
            "url": REDIS_URL,
            "prefix": f"{REDIS_PREFIX}.presence" if REDIS_PREFIX else "presence",
        },
    }
    if REDIS_URL
    else {"BACKEND": "presence.backends.memory.MemoryBackend"}
)

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# REST writes per user ("300/min"; "off" for none): realtime.throttling, check realtime.E024.
_write_rate = os.environ.get("REALTIME_WRITE_RATE", "300/min").strip()
WRITE_RATE = None if _write_rate.lower() in {"", "0", "off", "none"} else _write_rate

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        # Second, so an anonymous or badly authenticated request stays 403 (DRF answers 401
        # only when the first class sends a WWW-Authenticate header).
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # The API speaks JSON only: a malformed form body parses as an empty form, and a PATCH
    # with it would succeed as a no-op instead of being refused. DRF's JSONParser, but a
    # body nested too deep to decode is a 400 (DRF's own answers it with a 500).
    "DEFAULT_PARSER_CLASSES": ["realtime.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Every write becomes an event for each subscriber of its streams: a user's writes are
    # limited (429 with Retry-After), as a socket's publishes are. Reads are not counted.
    "DEFAULT_THROTTLE_CLASSES": ["realtime.throttling.WriteRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"realtime_writes": WRITE_RATE},
}

# OpenAPI at /api/schema/, Swagger UI at /api/docs/ (served from drf-spectacular-sidecar, no
# CDN). The event feed and SSE are plain Django views, described in docs/protocol.md instead.
SPECTACULAR_SETTINGS = {
    "TITLE": "django-realtime-log demo API",
    "VERSION": "0.1.0",
    "DESCRIPTION": (
        "The demo board's REST API and realtime tickets. Reads answer `ETag` and "
        "`X-Stream-Position`; `If-None-Match` gives 304, `If-Match` on writes gives 412 when "
        "stale, and a POST with an `Idempotency-Key` is done once. Objects the user may not "
        "see answer 404. The event feed (`/api/realtime/events/`), SSE (`/realtime/sse/`) and "
        "the WebSocket are described in docs/protocol.md."
    ),
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {"NotificationLevelEnum": "notifications.models.LEVEL_CHOICES"},
}

REALTIME: dict[str, object] = {
    "TENANT_RESOLVER": "board.policies.tenant_of",
    # With Redis, a user's publish bucket is shared by every node (keys under this site's
    # prefix: sites, and test workers, sharing a Redis keep their users apart).
    "PUBLISH_USER_REDIS": (
        {"url": REDIS_URL, "prefix": f"{REDIS_PREFIX}.rt" if REDIS_PREFIX else "rt"}
        if REDIS_URL
        else None
    ),
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# LOG_FORMAT=json gives one JSON object per line (realtime.logs); secrets are redacted either way.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "realtime.logs.RedactSecrets"}},
    "formatters": {
        "plain": {
            "()": "realtime.logs.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "realtime.logs.JSONFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["redact"],
        }
    },
    "loggers": {
        "realtime": {
            "handlers": ["console"],
            "level": os.environ.get("REALTIME_LOG_LEVEL", "INFO"),
        },
        "presence": {
            "handlers": ["console"],
            "level": os.environ.get("REALTIME_LOG_LEVEL", "INFO"),
        },
        "notifications": {"handlers": ["console"], "level": "INFO"},
        "django.request": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        # uvicorn logs each WebSocket's path with its query string ("?ticket=…"): through the
        # redacting handler. (daphne's access log shows the path only.)
        "uvicorn.error": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
