"""Settings of the test run: the demo's, and a second database for the tests of `using=`."""

import os
import uuid

# Every run, and every worker of a parallel run (pytest-xdist, `-n`), gets names of its own
# in the Redis of REDIS_URL (its daphne children inherit the variable), as the test databases
# of pytest-django get a suffix of their own. Redis pub/sub ignores the database number, and
# keys outlive a run: a user's publish bucket is keyed by pk, and the next run's fresh test
# database hands out the same pks. After a REDIS_PREFIX of the caller's own; worked out again
# in each process from what the first one noted (a worker inherits the controller's
# variables), and the keys are deleted when the run ends (tests/conftest.py).
_base = os.environ.setdefault("REALTIME_TEST_BASE_PREFIX", os.environ.get("REDIS_PREFIX", ""))
_run = os.environ.setdefault("REALTIME_TEST_RUN", uuid.uuid4().hex[:8])
RUN_TAG = f"test-{_run}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
os.environ["REDIS_PREFIX"] = f"{_base}.{RUN_TAG}" if _base else RUN_TAG

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
