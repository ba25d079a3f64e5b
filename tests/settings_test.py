"""Settings of the test run: the demo's, and a second database for the tests of `using=`."""

import os

# The workers of a parallel run (pytest-xdist, `-n`) share the Redis of REDIS_URL: each gets
# names of its own there (its daphne children inherit the variable), as the test databases
# of pytest-django get a suffix of their own. Redis pub/sub ignores the database number.
# Appended to a REDIS_PREFIX of the run's own, once (a child that imports these settings
# again inherits the worker's).
_worker = os.environ.get("PYTEST_XDIST_WORKER")
_prefix = os.environ.get("REDIS_PREFIX", "")
if _worker and not _prefix.endswith(f"test-{_worker}"):
    os.environ["REDIS_PREFIX"] = f"{_prefix}.test-{_worker}" if _prefix else f"test-{_worker}"

from config.settings import *  # noqa: E402, F403

# Only tests marked with databases=[..., "other"] touch it: an event log on another alias.
DATABASES["other"] = {  # noqa: F405
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": str(BASE_DIR / ".test-db-other.sqlite3"),  # noqa: F405
    "TEST": {"NAME": str(BASE_DIR / f".test-db-other-{os.getpid()}.sqlite3")},  # noqa: F405
    "OPTIONS": {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    },
}

# Test users are made by the thousand, and the default hasher spends ~0.2 s on each on
# purpose: a fast one keeps the suite minutes shorter. Daphne children of the tests run the
# demo's settings (PBKDF2 only): a password they check is made with
# `tests.factories.server_password`.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
